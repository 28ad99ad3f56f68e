"""The pair record: checks on its input, and its private file."""

import dataclasses
import stat

import pytest

from applianced.errors import InvalidArgument, StateError
from applianced.peer.pairing import PairRecord, PairStore, new_record

KEY = b"s" * 32
LOCAL = {"10.0.0.1", "10.1.0.1", "fd00::1", "127.0.0.1"}


def test_a_record_is_stored_private_and_read_back(tmp_path):
    store = PairStore(tmp_path)
    record = new_record("10.0.0.2", KEY, 7790, "10.1.0.2", ["10.0.0.1"], LOCAL)
    store.save(dataclasses.replace(record, peer_node="node-b"))
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load() == dataclasses.replace(record, peer_node="node-b")
    assert store.load().peer_addresses == ("10.0.0.2", "10.1.0.2")
    store.delete()
    assert store.load() is None


def test_the_key_never_shows_in_a_repr():
    record = PairRecord("10.0.0.2", 7790, b"very-secret-key-material-0123456789")
    assert "very-secret" not in repr(record)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("10.0.0.2", b"short", 7790, "", []), "32 to 4096 bytes"),
        (("10.0.0.2", KEY, 0, "", []), "out of range"),
        (("10.0.0.2", KEY, 70000, "", []), "out of range"),
        (("peer.example", KEY, 7790, "", []), "not an IPv4 or IPv6 address"),
        (("10.0.0.1", KEY, 7790, "", []), "cannot be the peer's address"),
        (("0.0.0.0", KEY, 7790, "", []), "cannot be the peer's address"),
        (("224.0.0.1", KEY, 7790, "", []), "cannot be the peer's address"),
        (("10.0.0.2", KEY, 7790, "10.0.0.2", []), "must differ"),
        (("10.0.0.2", KEY, 7790, "", ["10.9.9.9"]), "not configured on any interface"),
        (("fd00::2", KEY, 7790, "", ["10.0.0.1"]), "same IP version"),
        (("fe80::2", KEY, 7790, "", []), "link-local"),
    ],
)
def test_bad_input_is_refused_without_naming_the_key(args, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        new_record(*args, LOCAL)
    assert KEY.decode() not in str(refused.value)


def test_an_unusable_file_is_a_state_error(tmp_path):
    store = PairStore(tmp_path)
    store.path.write_text('{"version": 1, "peer_address": "10.0.0.2", "port": 7790, "key": "zz"}')
    with pytest.raises(StateError, match="unusable"):
        store.load()
    store.path.write_text('{"version": 2, "peer_address": "10.0.0.2", "port": 7790, "key": "00"}')
    with pytest.raises(StateError, match="version 2"):
        store.load()
