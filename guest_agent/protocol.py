"""The guest protocol: JSON text frames over one WebSocket that the guest opens.

Guest -> backend: ``hello`` (first frame: who it is, its token, protocol ``version`` and
``capabilities``: the step kinds it runs), ``output``, ``artifact``, ``exit``.
Backend -> guest: ``welcome``, ``exec``, ``cancel``, ``clock`` (set the machine's clock to
``time``, after a suspension: the agent does it, steps cannot).

``exec`` carries the ``step`` as a JSON object with its ``kind`` (terminal, browser, file)
and its ``check``. A step's ``artifact`` frames (a browser step's screenshot, base64) come
before its ``exit``, which carries the ``check``'s outcome and the step's ``result``.

``exec`` is idempotent per ``exec_id``: sent again for a command the guest already knows
(after a reconnect, or by a retried activity), it re-attaches and replays output after
``after_seq`` instead of starting the command twice. Each ``output`` and ``exit`` carries
the ``after_seq`` it follows (the previous line this attachment sent, or where it started),
so the backend can tell an attachment's stream from the tail of one it replaced.
"""

PROTOCOL_VERSION = 2

HELLO = "hello"
WELCOME = "welcome"
EXEC = "exec"
CANCEL = "cancel"
CLOCK = "clock"
OUTPUT = "output"
ARTIFACT = "artifact"
EXIT = "exit"

# Largest incoming frame the gateway reads before the hello is verified, and after: an
# unauthenticated peer gets no room to make the backend buffer (or log) much of anything.
MAX_HELLO_SIZE = 16 * 1024
MAX_FRAME_SIZE = 512 * 1024

# Output lines longer than this many bytes are sent in pieces: even with every byte
# JSON-escaped (``\u00XX``, 6 characters), an output frame stays under MAX_FRAME_SIZE.
MAX_OUTPUT_CHUNK = 64 * 1024

# The largest artifact a guest sends, in bytes before base64 (which adds a third): one
# artifact frame stays under MAX_FRAME_SIZE.
MAX_ARTIFACT_BYTES = 360 * 1024
# Media types an artifact may have: served as they are by the API, so nothing a browser
# would run (no HTML, no SVG).
ARTIFACT_MEDIA_TYPES = ("image/jpeg", "image/png", "text/plain", "application/octet-stream")
# Artifact names: a plain file name.
ARTIFACT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"

# Texts an exit's result carries (extracted page text, a file's content) are cut to this
# many characters: they travel on in workflow payloads.
MAX_RESULT_CHARS = 8000

# WebSocket close code for a refused hello (bad token, unknown sandbox).
CLOSE_UNAUTHORIZED = 4401

# Exit code reported for a command killed by its timeout, as coreutils' timeout(1) does.
EXIT_TIMED_OUT = 124
