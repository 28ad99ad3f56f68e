"""The two systemd protocols the daemon speaks: sd_notify and the journal's native socket.

Both are datagrams on a Unix socket named by systemd. Without systemd (tests, a shell)
notifications are dropped and logs go to standard error with the same fields.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Fields that callers pass through ``extra=`` and that the journal indexes.
STRUCTURED_FIELDS = ("OBJECT", "OPERATION", "OUTCOME")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``, ``WATCHDOG=1``) to systemd; False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        # The manager went away (or a test stopped listening): nothing to tell.
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half the configured timeout), or None if disabled."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


class JournalHandler(logging.Handler):
    """Writes records to the journal with structured fields, in its native protocol."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            fields = {
                "MESSAGE": message,
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            for name in STRUCTURED_FIELDS:
                value = getattr(record, name, None)
                if value is not None:
                    fields[name] = str(value)
            self._socket.sendto(_encode(fields), JOURNAL_SOCKET)
        except Exception:
            self.handleError(record)


def _encode(fields: dict[str, str]) -> bytes:
    chunks = []
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:
            # Multi-line values are length-prefixed in the native protocol.
            chunks.append(key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
        else:
            chunks.append(key.encode() + b"=" + data + b"\n")
    return b"".join(chunks)


class FieldsFormatter(logging.Formatter):
    """For standard error: the message followed by the structured fields that are set."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{name}={getattr(record, name)}" for name in STRUCTURED_FIELDS if hasattr(record, name))
        return f"{text} [{fields}]" if fields else text


def setup_logging(identifier: str, level: int = logging.INFO) -> None:
    """Log to the journal when it is there (under systemd), else to standard error."""
    if os.environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET):
        handler: logging.Handler = JournalHandler(identifier)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
