"""appliancectl's output for people: tables and one-sentence errors."""

import argparse

from applianced.cli.client import DBusError, run_without_loop
from applianced.cli.main import Commands, render_table
from applianced.cli.messages import describe
from applianced.constants import PEER_INTERFACE, PEER_PATH, error_name
from applianced.errors import ALL_ERRORS


def test_table_aligns_columns_and_formats_sizes_and_booleans():
    table = render_table(
        [
            {"name": "a", "size": 10 * 1024**3, "enabled": True},
            {"name": "longer-name", "size": 512, "enabled": False},
        ]
    )
    assert table.splitlines() == [
        "NAME         SIZE    ENABLED",
        "a            10 GiB  yes",
        "longer-name  512 B   no",
    ]
    assert render_table([]) == "(none)"


def test_each_named_error_becomes_a_sentence_and_an_exit_code():
    seen = set()
    for kind, code in (("NotFound", 3), ("AlreadyExists", 4), ("InvalidArgument", 5), ("Busy", 6)):
        message, exit_code = describe(DBusError(f"org.applianced.Appliance1.Error.{kind}", "disk 'x' said so"))
        assert exit_code == code
        assert message.endswith(": disk 'x' said so")
        seen.add(message.split(":")[0])
    assert len(seen) == 4
    message, code = describe(DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "whatever"))
    assert (code, message.startswith("applianced is not running")) == (12, True)
    message, code = describe(DBusError("org.freedesktop.DBus.Error.AccessDenied", "rejected send message"))
    assert (code, "only root" in message) == (11, True)
    assert describe(DBusError("com.example.Other", "odd"))[1] == 1


class PeerProperties:
    """A client that answers only the Peer object's GetAll, with a clock 2.5 s off."""

    def __init__(self, offset):
        self.offset = offset

    async def objects(self):
        return {PEER_PATH: {PEER_INTERFACE: {}}}

    async def properties(self, path, interface):
        assert (path, interface) == (PEER_PATH, PEER_INTERFACE)
        return {
            "PeerAddress": "10.0.1.2",
            "AuxAddress": "",
            "Port": 7790,
            "LocalAddresses": [],
            "PeerNodeId": "node-b",
            "Connected": True,
            "SessionStarted": 1.0,
            "Paths": [["10.0.1.2", "main", True, 0.0005, 2.0]],
            "LastMessage": 2.0,
            "LastMessageKind": "pong",
            "ClockOffset": self.offset,
            "ClockOffsetKnown": True,
            "Drops": {"forged": 3},
        }


def test_pair_status_warns_when_the_clocks_differ(capsys):
    args = argparse.Namespace(json=False)
    run_without_loop(Commands(PeerProperties(2.5)).pair_status(args))
    out, err = capsys.readouterr()
    assert "warning: the nodes' clocks differ by +2.500 s" in err
    assert "clock offset:  +2500.0 ms" in out and "main 10.0.1.2: up, rtt 0.50 ms" in out
    assert "dropped:       forged 3" in out
    run_without_loop(Commands(PeerProperties(0.2)).pair_status(args))
    assert capsys.readouterr().err == ""


def test_every_engine_error_has_a_sentence_and_an_exit_code_of_its_own():
    codes = set()
    for error in ALL_ERRORS:
        message, code = describe(DBusError(error_name(error.__name__), "said so"))
        assert code not in (1, *codes), error.__name__
        assert not message.startswith("D-Bus error"), error.__name__
        codes.add(code)
    incomplete = describe(DBusError(error_name("Incomplete"), "said so"))
    assert incomplete == ("done in part, look before repeating it: said so", 15)
