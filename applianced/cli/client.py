"""A small blocking D-Bus client for applianced: method calls and the object tree, nothing else.

It speaks to the system bus itself (address, EXTERNAL authentication, ``Hello``, calls
matched to their replies) with :mod:`applianced.cli.wire`, instead of through dbus-fast's
asyncio MessageBus: importing asyncio and dbus-fast was most of the CLI's start-up, which
the VM tests pay seconds for at every call under emulation. The calls block on the socket,
and the commands stay coroutines (``await client.call(...)``) that never suspend, run by
:func:`run_without_loop`.
"""

from __future__ import annotations

# _socket is the C module under socket: socket.py adds nothing this client uses (enums,
# makefile, selectors) and would cost a fifth of the CLI's imports; calls and errors are the same.
import _socket
import os
import time

from applianced.cli.wire import (
    ERROR,
    METHOD_RETURN,
    PREFIX_LENGTH,
    Message,
    message_length,
    method_call,
    parse_message,
    unpack_variants,
)
from applianced.constants import BUS_NAME, ROOT_PATH

# The specification's default; on current systems /var/run is a link to /run.
DEFAULT_SYSTEM_BUS_ADDRESS = "unix:path=/var/run/dbus/system_bus_socket"
BUS_DAEMON = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
# Authentication lines are short; a longer one is not a bus talking.
MAX_AUTH_LINE = 16 * 1024
RECEIVE_SIZE = 64 * 1024
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# typing is for checkers only: importing it would cost a tenth of the CLI's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any, TypeVar

    Result = TypeVar("Result")


class DBusError(Exception):
    """An error reply: ``type`` is its D-Bus error name and ``text`` its message."""

    def __init__(self, type_: str, text: str) -> None:
        super().__init__(text)
        self.type = type_
        self.text = text


class CallTimeout(Exception):
    """No reply within the connection's timeout. The callee may still be working on the call
    (a bus never cancels one), so what it changes may yet change; the connection is out of
    step with its replies and only good for closing."""

    def __init__(self, destination: str, call: str, seconds: float) -> None:
        super().__init__(f"{destination} did not answer {call} within {seconds:g} s")
        self.destination = destination
        self.call = call
        self.seconds = seconds


class BusAddressError(ValueError):
    """A bus address that names no transport this client can use."""


def parse_address(address: str) -> list[tuple[str, dict[str, str]]]:
    """The addresses of a D-Bus address string, in order: ``transport:key=value,...;...``."""
    addresses = []
    for entry in address.split(";"):
        if not entry:
            continue
        transport, colon, options = entry.partition(":")
        if not colon:
            raise BusAddressError(f"bus address {entry!r} names no transport")
        values = {}
        for option in options.split(","):
            if option:
                key, equals, value = option.partition("=")
                if not equals:
                    raise BusAddressError(f"bus address {entry!r}: option {option!r} has no value")
                values[key] = _unescape(value)
        addresses.append((transport, values))
    if not addresses:
        raise BusAddressError(f"bus address {address!r} is empty")
    return addresses


def _unescape(value: str) -> str:
    """An address value with its ``%XX`` escapes decoded (every byte may be escaped)."""
    if "%" not in value:
        return value
    raw = bytearray()
    position = 0
    while position < len(value):
        if value[position] == "%":
            digits = value[position + 1 : position + 3]
            if len(digits) != 2 or not _HEX_DIGITS.issuperset(digits):
                raise BusAddressError(f"bus address value {value!r} has a bad escape")
            raw.append(int(digits, 16))
            position += 3
        else:
            raw += value[position].encode()
            position += 1
    return raw.decode()


def _socket_address(transport: str, options: dict[str, str]) -> str | bytes:
    if transport == "unix" and "path" in options:
        return options["path"]
    if transport == "unix" and "abstract" in options:
        return b"\0" + options["abstract"].encode()
    raise BusAddressError(f"bus transport {transport!r} with {sorted(options)} is not supported (only unix sockets)")


class Connection:
    """One authenticated connection to a message bus, making blocking method calls.

    With a ``call_timeout`` (seconds), authentication and each call give up when the whole
    reply has not come within it: dbus-daemon's system bus times no call out, so a callee that
    never answers would otherwise hang the caller for ever.
    """

    def __init__(self, sock: _socket.socket, call_timeout: float | None = None) -> None:
        self._socket = sock
        self._received = bytearray()
        self._serial = 0
        self.call_timeout = call_timeout
        self._deadline: float | None = None

    @classmethod
    def system_bus(cls, call_timeout: float | None = None) -> Connection:
        """Connected to the system bus: ``DBUS_SYSTEM_BUS_ADDRESS`` if set, else the default."""
        return cls.open(os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS_ADDRESS, call_timeout)

    @classmethod
    def open(cls, address: str, call_timeout: float | None = None) -> Connection:
        """Connected, authenticated and named by the bus at ``address``. Its addresses are tried
        in turn, as dbus-fast does, and the last one's error is raised if none can be reached."""
        error: OSError | None = None
        for transport, options in parse_address(address):
            target = _socket_address(transport, options)
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                sock.connect(target)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            connection = cls(sock, call_timeout)
            try:
                connection._authenticate()
                connection.call(*BUS_DAEMON, "Hello")
            except BaseException:
                connection.close()
                raise
            return connection
        assert error is not None
        raise error

    def close(self) -> None:
        self._socket.close()

    def _authenticate(self) -> None:
        """SASL EXTERNAL: the kernel tells the bus who we are; we name the same uid, as ASCII
        decimal digits in hex, as the specification asks."""
        uid = str(os.getuid()).encode().hex()
        self._socket.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        self._start_clock()
        try:
            reply = self._read_line()
        except TimeoutError:
            raise CallTimeout("the bus", "authentication", self.call_timeout or 0) from None
        if not reply.startswith(b"OK "):
            raise ConnectionError(f"the bus refused EXTERNAL authentication: {reply.decode(errors='replace')}")
        # The bus does not answer BEGIN: messages follow from the next byte on.
        self._socket.sendall(b"BEGIN\r\n")

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._received:
            if len(self._received) > MAX_AUTH_LINE:
                raise ConnectionError("the bus sent an authentication line that is too long")
            self._receive_more()
        line, _, rest = bytes(self._received).partition(b"\r\n")
        self._received[:] = rest
        return line

    def _start_clock(self) -> None:
        self._deadline = None if self.call_timeout is None else time.monotonic() + self.call_timeout

    def _receive_more(self, wanted: int = RECEIVE_SIZE) -> None:
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._socket.settimeout(left)
        chunk = self._socket.recv(max(wanted, RECEIVE_SIZE))
        if not chunk:
            raise EOFError("the bus closed the connection")
        self._received += chunk

    def _receive_message(self) -> Message:
        while len(self._received) < PREFIX_LENGTH:
            self._receive_more()
        length = message_length(bytes(self._received[:PREFIX_LENGTH]))
        while len(self._received) < length:
            self._receive_more(length - len(self._received))
        data = bytes(self._received[:length])
        del self._received[:length]
        return parse_message(data)

    def call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        """Send a method call and return its reply's body, or raise its error as :class:`DBusError`.
        Whatever else the bus sends meanwhile (NameAcquired after Hello) is not for us: dropped."""
        self._serial += 1
        serial = self._serial
        self._socket.sendall(method_call(serial, destination, path, interface, member, signature, body or []))
        self._start_clock()
        try:
            while True:
                reply = self._receive_message()
                if reply.type in (METHOD_RETURN, ERROR) and reply.reply_serial == serial:
                    break
        except TimeoutError:
            raise CallTimeout(destination, f"{interface}.{member}", self.call_timeout or 0) from None
        if reply.type == ERROR:
            raise DBusError(reply.error_name or "unknown", reply.body[0] if reply.body else "")
        return reply.body


class Client:
    """applianced's side of the bus: calls to its objects, and its object tree."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, call_timeout: float | None = None) -> Client:
        return cls(Connection.system_bus(call_timeout))

    def close(self) -> None:
        self.connection.close()

    async def call(
        self, path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        return self.connection.call(BUS_NAME, path, interface, member, signature, body)

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every object below the root: path -> interface -> property -> plain value."""
        (managed,) = await self.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return unpack_variants(managed)

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        (values,) = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
        return unpack_variants(values)


def run_without_loop(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """Run one of the CLI's coroutines to its end, without an event loop.

    The client's calls block on the socket, so a command never suspends and the first step
    finishes it. A coroutine that does suspend waits for something only an event loop would
    deliver: that is a bug, reported instead of hanging.
    """
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value
    coroutine.close()
    raise RuntimeError("a command of appliancectl waited for an event loop, and the CLI runs none")
