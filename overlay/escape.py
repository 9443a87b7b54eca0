"""Text from peers, LAN devices and servers shown safely: every control character as an escape.

Names, chat, server messages, a router's UPnP answers: any of them may carry terminal escape
sequences (clear the screen, retitle the window, fake a line) or a newline that forges a log
line. ``visible`` turns C0 / C1 controls, DEL and the bidirectional overrides into ``\\xNN`` /
``\\uNNNN``; the CLI prints values through it (``cli_base.lit``), and ``log_to_stderr`` gives the
daemon's and the server's logs a formatter that passes every message through it, so no log call
has to remember which of its arguments came from outside.
"""

from __future__ import annotations

import logging
import re
import sys

# C0 and C1 controls, DEL, and the bidirectional overrides and isolates that reorder what is shown
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def visible(value: object) -> str:
    """``value`` as text with every control character shown as an escape (ESC is ``\\x1b``)."""
    return _INVISIBLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                          str(value))


class EscapingFormatter(logging.Formatter):
    """A log message (with its arguments) on one line, its control characters escaped; the
    traceback of ``exc_info`` (our own text) is appended as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = visible(record.message)
        return super().formatMessage(record)


def log_to_stderr(level: str, stream=None) -> None:
    """The daemon's and the server's logging: ``level`` by name, to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
