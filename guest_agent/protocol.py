"""The guest protocol: JSON text frames over one WebSocket that the guest opens.

Guest -> backend: ``hello`` (first frame: who it is, its token), ``output``, ``exit``.
Backend -> guest: ``welcome``, ``exec``, ``cancel``.

``exec`` is idempotent per ``exec_id``: sent again for a command the guest already knows
(after a reconnect, or by a retried activity), it re-attaches and replays output after
``after_seq`` instead of starting the command twice. Each ``output`` and ``exit`` carries
the ``after_seq`` it follows (the previous line this attachment sent, or where it started),
so the backend can tell an attachment's stream from the tail of one it replaced.
"""

PROTOCOL_VERSION = 1

HELLO = "hello"
WELCOME = "welcome"
EXEC = "exec"
CANCEL = "cancel"
OUTPUT = "output"
EXIT = "exit"

# Largest incoming frame the gateway reads before the hello is verified, and after: an
# unauthenticated peer gets no room to make the backend buffer (or log) much of anything.
MAX_HELLO_SIZE = 16 * 1024
MAX_FRAME_SIZE = 512 * 1024

# Output lines longer than this many bytes are sent in pieces: even with every byte
# JSON-escaped (``\u00XX``, 6 characters), an output frame stays under MAX_FRAME_SIZE.
MAX_OUTPUT_CHUNK = 64 * 1024

# WebSocket close code for a refused hello (bad token, unknown sandbox).
CLOSE_UNAUTHORIZED = 4401

# Exit code reported for a command killed by its timeout, as coreutils' timeout(1) does.
EXIT_TIMED_OUT = 124
