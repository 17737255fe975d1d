"""The guest protocol: JSON text frames over one WebSocket that the guest opens.

Guest -> backend: ``hello`` (first frame: who it is, its token), ``output``, ``exit``.
Backend -> guest: ``welcome``, ``exec``, ``cancel``.

``exec`` is idempotent per ``exec_id``: sent again for a command the guest already knows
(after a reconnect, or by a retried activity), it re-attaches and replays output after
``after_seq`` instead of starting the command twice.
"""

PROTOCOL_VERSION = 1

HELLO = "hello"
WELCOME = "welcome"
EXEC = "exec"
CANCEL = "cancel"
OUTPUT = "output"
EXIT = "exit"

# WebSocket close code for a refused hello (bad token, unknown sandbox).
CLOSE_UNAUTHORIZED = 4401

# Exit code reported for a command killed by its timeout, as coreutils' timeout(1) does.
EXIT_TIMED_OUT = 124
