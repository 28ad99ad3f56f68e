"""The CLI's blocking D-Bus client against a scripted bus: addresses, authentication, replies.

The bus side is a thread on a Unix socket that answers with messages built by dbus-fast,
so that what the client reads comes from another implementation. The real dbus-daemon
and applianced are the dbus tier's (tests/dbus).
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading

import dbus_fast
import pytest

from applianced.cli import wire
from applianced.cli.client import (
    BusAddressError,
    CallTimeout,
    Client,
    Connection,
    DBusError,
    parse_address,
    run_without_loop,
)
from applianced.cli.main import main

GUID = b"0123456789abcdef0123456789abcdef"


def reply_to(call, signature="", body=(), reply_serial=None):
    return bytes(
        dbus_fast.Message(
            message_type=dbus_fast.MessageType.METHOD_RETURN,
            reply_serial=reply_serial or call.serial,
            serial=1000 + call.serial,
            signature=signature,
            body=list(body),
        )._marshall(False)
    )


def error_to(call, name, text):
    return bytes(
        dbus_fast.Message(
            message_type=dbus_fast.MessageType.ERROR,
            error_name=name,
            reply_serial=call.serial,
            serial=2000 + call.serial,
            signature="s",
            body=[text],
        )._marshall(False)
    )


def signal(member):
    return bytes(
        dbus_fast.Message(
            message_type=dbus_fast.MessageType.SIGNAL,
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member=member,
            signature="s",
            body=[":1.7"],
            serial=3000,
        )._marshall(False)
    )


class ScriptedBus:
    """One connection's bus side: EXTERNAL authentication, then ``answer(call)`` for each call,
    whose pieces are sent one by one (small pieces make the client put messages together)."""

    def __init__(self, address, answer, auth_reply=b"OK " + GUID + b"\r\n"):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(1)
        self.answer = answer
        self.auth_reply = auth_reply
        self.auth_line = b""
        self.calls = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        connection, _ = self.listener.accept()
        # A client may hang up while its bus still writes (NameAcquired after Hello's reply),
        # as a real bus sees every day.
        with connection, contextlib.suppress(EOFError, BrokenPipeError, ConnectionResetError):
            received = b""
            while b"\r\n" not in received:
                received += self._receive(connection)
            self.auth_line, _, received = received.partition(b"\r\n")
            connection.sendall(self.auth_reply)
            if not self.auth_reply.startswith(b"OK"):
                return
            while not received.startswith(b"BEGIN\r\n"):
                received += self._receive(connection)
            received = received[len(b"BEGIN\r\n") :]
            while True:
                while len(received) < wire.PREFIX_LENGTH or len(received) < wire.message_length(received[:16]):
                    received += self._receive(connection)
                length = wire.message_length(received[:16])
                call = wire.parse_message(received[:length])
                received = received[length:]
                self.calls.append(call)
                pieces = self.answer(call)
                if pieces is None:
                    return  # hang up
                for piece in pieces:
                    connection.sendall(piece)

    @staticmethod
    def _receive(connection):
        chunk = connection.recv(65536)
        if not chunk:
            raise EOFError
        return chunk

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


def hello_then(answer):
    """Answers Hello as the bus does (reply, then NameAcquired), and the rest with ``answer``."""

    def respond(call):
        if call.fields[wire.MEMBER] == "Hello":
            return [reply_to(call, "s", [":1.7"]), signal("NameAcquired")]
        return answer(call)

    return respond


def in_pieces(data, size):
    return [data[start : start + size] for start in range(0, len(data), size)]


@pytest.fixture
def socket_path(tmp_path):
    return str(tmp_path / "bus")


def test_authenticates_as_its_uid_and_says_hello_first(socket_path):
    bus = ScriptedBus(socket_path, hello_then(lambda call: [reply_to(call, "s", ["pong"])]))
    connection = Connection.open(f"unix:path={socket_path}")
    body = connection.call("org.example", "/org/example", "org.example.I", "Ping", "s", ["ping"])
    connection.close()
    bus.close()
    # The uid as ASCII decimal digits, hex-encoded, after the NUL byte that opens the protocol.
    assert bus.auth_line == b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode()
    hello, ping = bus.calls
    assert (hello.fields[wire.DESTINATION], hello.fields[wire.MEMBER], hello.serial) == (
        "org.freedesktop.DBus",
        "Hello",
        1,
    )
    assert (ping.fields[wire.PATH], ping.fields[wire.INTERFACE], ping.fields[wire.MEMBER]) == (
        "/org/example",
        "org.example.I",
        "Ping",
    )
    assert (ping.fields[wire.SIGNATURE], ping.body, ping.serial) == ("s", ["ping"], 2)
    assert body == ["pong"]


def test_a_reply_in_many_pieces_after_other_messages_is_the_one_returned(socket_path):
    big = {f"key{i}": "v" * 300 for i in range(400)}

    def answer(call):
        not_ours = reply_to(call, "s", ["not ours"], reply_serial=call.serial + 50)
        return [signal("Whatever"), not_ours, *in_pieces(reply_to(call, "a{ss}", [big]), 1000)]

    bus = ScriptedBus(socket_path, hello_then(answer))
    connection = Connection.open(f"unix:path={socket_path}")
    body = connection.call("org.example", "/", "org.example.I", "Big")
    connection.close()
    bus.close()
    assert body == [big]
    assert sum(len(key) + len(value) for key, value in big.items()) > 64 * 1024


def test_an_error_reply_is_a_dbus_error_with_its_name_and_text(socket_path):
    bus = ScriptedBus(
        socket_path,
        hello_then(lambda call: [error_to(call, "org.applianced.Appliance1.Error.NotFound", "disk 'x' is not there")]),
    )
    client = Client(Connection.open(f"unix:path={socket_path}"))
    with pytest.raises(DBusError) as raised:
        run_without_loop(client.call("/org/applianced/Appliance1", "org.applianced.Appliance1.Manager", "Export"))
    client.close()
    bus.close()
    assert (raised.value.type, raised.value.text, str(raised.value)) == (
        "org.applianced.Appliance1.Error.NotFound",
        "disk 'x' is not there",
        "disk 'x' is not there",
    )


def test_objects_and_properties_come_without_variants(socket_path):
    tree = {
        "/org/a": {"org.x.I": {"Name": dbus_fast.Variant("s", "a"), "Paths": dbus_fast.Variant("a(sb)", [["p", True]])}}
    }

    def answer(call):
        if call.fields[wire.MEMBER] == "GetManagedObjects":
            return [reply_to(call, "a{oa{sa{sv}}}", [tree])]
        return [reply_to(call, "a{sv}", [{"Version": dbus_fast.Variant("s", "0.1.0")}])]

    bus = ScriptedBus(socket_path, hello_then(answer))
    client = Client(Connection.open(f"unix:path={socket_path}"))
    objects = run_without_loop(client.objects())
    properties = run_without_loop(client.properties("/org/a", "org.x.I"))
    client.close()
    bus.close()
    assert objects == {"/org/a": {"org.x.I": {"Name": "a", "Paths": [["p", True]]}}}
    assert properties == {"Version": "0.1.0"}
    assert (bus.calls[-1].fields[wire.SIGNATURE], bus.calls[-1].body) == ("s", ["org.x.I"])


def test_addresses_are_tried_in_turn_and_may_be_abstract_or_escaped(tmp_path, monkeypatch):
    name = f"applianced-test-{os.getpid()}"
    bus = ScriptedBus("\0" + name, hello_then(lambda call: [reply_to(call)]))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/missing;unix:abstract={name}")
    Connection.system_bus().close()
    bus.close()

    spaced = tmp_path / "a dir,with=odd chars"
    spaced.mkdir()
    bus = ScriptedBus(str(spaced / "bus"), hello_then(lambda call: [reply_to(call)]))
    escaped = str(spaced / "bus").replace("%", "%25").replace(" ", "%20").replace(",", "%2c").replace("=", "%3D")
    Connection.open(f"unix:guid={GUID.decode()},path={escaped}").close()
    bus.close()


def test_address_strings_parse_as_the_specification_says():
    assert parse_address("unix:path=/run/dbus/system_bus_socket") == [("unix", {"path": "/run/dbus/system_bus_socket"})]
    assert parse_address("unix:abstract=x%2fy,guid=00;;tcp:host=h,port=1") == [
        ("unix", {"abstract": "x/y", "guid": "00"}),
        ("tcp", {"host": "h", "port": "1"}),
    ]
    assert parse_address("unix:path=/%c3%a9") == [("unix", {"path": "/é"})]
    for bad in ("", ";", "nocolon", "unix:path", "unix:path=%zz", "unix:path=%4"):
        with pytest.raises(BusAddressError):
            parse_address(bad)
    with pytest.raises(BusAddressError):
        Connection.open("tcp:host=127.0.0.1,port=1")


def test_a_missing_or_dead_bus_is_an_os_error_that_main_reports(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError):
        Connection.open(f"unix:path={tmp_path}/missing")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead"))
    dead.close()
    with pytest.raises(ConnectionRefusedError):
        Connection.open(f"unix:path={tmp_path}/dead")
    for address in (f"unix:path={tmp_path}/missing", f"unix:path={tmp_path}/dead"):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        assert main(["status"]) == 12
        assert capsys.readouterr().err == "appliancectl: cannot reach the system D-Bus; is dbus running?\n"


def test_a_refused_authentication_or_hello_or_a_hang_up_is_an_error(socket_path):
    bus = ScriptedBus(socket_path, hello_then(lambda call: []), auth_reply=b"REJECTED EXTERNAL\r\n")
    with pytest.raises(ConnectionError, match="refused EXTERNAL"):
        Connection.open(f"unix:path={socket_path}")
    bus.close()
    os.unlink(socket_path)
    bus = ScriptedBus(socket_path, lambda call: [error_to(call, "org.freedesktop.DBus.Error.LimitsExceeded", "no")])
    with pytest.raises(DBusError, match="no"):
        Connection.open(f"unix:path={socket_path}")
    bus.close()
    os.unlink(socket_path)
    bus = ScriptedBus(socket_path, hello_then(lambda call: None))
    connection = Connection.open(f"unix:path={socket_path}")
    with pytest.raises(EOFError):
        connection.call("org.example", "/", "org.example.I", "Crash")
    connection.close()
    bus.close()


def test_a_call_nobody_answers_in_time_is_a_timeout_that_main_reports(socket_path, monkeypatch, capsys):
    # Replies that come in pieces within the time are not cut short by it.
    bus = ScriptedBus(socket_path, hello_then(lambda call: in_pieces(reply_to(call, "s", ["x" * 5000]), 100)))
    connection = Connection.open(f"unix:path={socket_path}", call_timeout=5)
    assert connection.call("org.example", "/", "org.example.I", "Slowish") == ["x" * 5000]
    connection.close()
    bus.close()
    os.unlink(socket_path)

    bus = ScriptedBus(socket_path, hello_then(lambda call: []))
    connection = Connection.open(f"unix:path={socket_path}", call_timeout=0.2)
    with pytest.raises(CallTimeout) as raised:
        connection.call("org.example", "/", "org.example.I", "Never")
    connection.close()
    bus.close()
    assert (raised.value.destination, raised.value.call, raised.value.seconds) == (
        "org.example",
        "org.example.I.Never",
        0.2,
    )
    os.unlink(socket_path)

    bus = ScriptedBus(socket_path, hello_then(lambda call: []))
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={socket_path}")
    assert main(["--call-timeout", "0.2", "status"]) == 14
    bus.close()
    error = capsys.readouterr().err
    assert error.startswith(
        "appliancectl: applianced did not answer org.freedesktop.DBus.Properties.GetAll within 0.2 s;"
        " it may still make the change"
    )


def test_a_bus_that_never_finishes_authentication_is_a_timeout(socket_path):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(socket_path)
    silent.listen(1)  # connections wait in the backlog, never accepted, never answered
    with pytest.raises(CallTimeout, match=r"the bus did not answer authentication within 0\.2 s"):
        Connection.open(f"unix:path={socket_path}", call_timeout=0.2)
    silent.close()


def test_a_coroutine_runs_to_its_end_without_a_loop_unless_it_suspends():
    async def finishes():
        return 42

    class Suspends:
        def __await__(self):
            yield

    async def waits():
        await Suspends()

    assert run_without_loop(finishes()) == 42
    with pytest.raises(RuntimeError, match="event loop"):
        run_without_loop(waits())


def test_the_cli_starts_without_asyncio_dbus_fast_typing_or_socket_py():
    # Each of these cost milliseconds on the host and a good part of a second under TCG, at
    # every start of appliancectl (bench/cli_start.py).
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, applianced.cli.main; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    heavy = {"asyncio", "dbus_fast", "ssl", "concurrent", "typing", "socket"}
    assert heavy.isdisjoint(name.split(".")[0] for name in loaded)
