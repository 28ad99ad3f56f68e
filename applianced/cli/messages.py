"""Every D-Bus error the CLI can meet, turned into one sentence and an exit code."""

from __future__ import annotations

from applianced.cli.client import CallTimeout, DBusError
from applianced.constants import BUS_NAME, error_name

# Exit codes by error; 1 stays "anything else" and 2 is argparse's usage error.
EXIT_CODES = {
    error_name("NotFound"): 3,
    error_name("AlreadyExists"): 4,
    error_name("InvalidArgument"): 5,
    error_name("Busy"): 6,
    error_name("NotSupported"): 7,
    error_name("KernelError"): 8,
    error_name("StateError"): 9,
    error_name("Failed"): 10,
    "org.freedesktop.DBus.Error.AccessDenied": 11,
    "org.freedesktop.DBus.Error.ServiceUnknown": 12,
    "org.freedesktop.DBus.Error.NameHasNoOwner": 12,
    error_name("Unreachable"): 13,
    error_name("Incomplete"): 15,
}
# A call that got no answer within the CLI's timeout (not a D-Bus error: nobody replied).
EXIT_NO_ANSWER = 14

_PREFIXES = {
    error_name("NotFound"): "not found",
    error_name("AlreadyExists"): "already exists",
    error_name("InvalidArgument"): "invalid argument",
    error_name("Busy"): "busy",
    error_name("NotSupported"): "not supported",
    error_name("KernelError"): "the kernel refused the change, nothing was changed",
    error_name("StateError"): "the state file could not be used",
    error_name("Failed"): "applianced failed",
    error_name("Unreachable"): "the peer node did not answer, nothing was changed",
    error_name("Incomplete"): "done in part, look before repeating it",
}


def describe(error: DBusError) -> tuple[str, int]:
    """Return the sentence to print and the exit code for ``error``."""
    name = error.type
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return f"applianced is not running (nobody owns {BUS_NAME} on the system bus)", EXIT_CODES[name]
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return "permission denied: only root may change the appliance configuration", EXIT_CODES[name]
    prefix = _PREFIXES.get(name)
    if prefix is None:
        return f"D-Bus error {name}: {error.text}", 1
    return f"{prefix}: {error.text}", EXIT_CODES[name]


def describe_timeout(error: CallTimeout) -> tuple[str, int]:
    """The sentence and exit code for a call that got no answer in time."""
    if error.destination != BUS_NAME:
        return f"the system D-Bus did not answer {error.call} within {error.seconds:g} s", EXIT_NO_ANSWER
    return (
        f"applianced did not answer {error.call} within {error.seconds:g} s; it may still make the change,"
        " so look (list, status) before repeating it, and see its log (systemctl kill -s USR1 applianced"
        " writes what it is doing there)",
        EXIT_NO_ANSWER,
    )


# The system bus itself cannot be reached (no socket, or nobody listening on it).
NO_BUS = ("cannot reach the system D-Bus; is dbus running?", 12)


class UsageError(Exception):
    """A CLI-side mistake (e.g. a name that resolves to nothing); exit code 3 or 5."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
