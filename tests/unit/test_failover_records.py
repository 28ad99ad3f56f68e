"""The failover record: kept across restarts, private, validated, history bounded."""

import stat

import pytest

from applianced.errors import InvalidArgument, StateError
from applianced.failover.addresses import VirtualAddress
from applianced.failover.records import HISTORY, Event, FailoverRecord, FailoverStore, PingNode, check_heartbeat


def test_a_record_survives_its_file(tmp_path):
    store = FailoverStore(tmp_path)
    assert store.load() == FailoverRecord()  # never written: stopped, nothing configured
    record = FailoverRecord(
        addresses=(VirtualAddress("eth1", "10.0.0.10", 24),),
        ping_nodes=(PingNode("10.0.0.254", "eth1"),),
        targets=("t1",),
        interval=0.5,
        misses=4,
        role="active",
        active_since=1_700_000_000.5,
    ).with_event(Event(1_700_000_000.5, "active", "started", (("add 10.0.0.10", 0.01),)))
    store.save(record)
    assert store.load() == record
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert record.deadline == 2.0


def test_a_damaged_record_is_a_state_error(tmp_path):
    store = FailoverStore(tmp_path)
    store.path.write_text('{"version": 1, "failover": {"misses": "three"}}')
    with pytest.raises(StateError, match=r"failover\.json is unusable"):
        store.load()
    store.path.write_text('{"version": 7, "failover": {}}')
    with pytest.raises(StateError, match="format version 7"):
        store.load()


def test_the_history_keeps_the_last_events():
    record = FailoverRecord()
    for number in range(HISTORY + 5):
        record = record.with_event(Event(float(number), "passive", f"event {number}"))
    assert len(record.history) == HISTORY and record.history[-1].reason == f"event {HISTORY + 4}"


@pytest.mark.parametrize(("interval", "misses"), [(0.05, 3), (11.0, 3), (1.0, 1), (1.0, 31)])
def test_heartbeats_outside_their_bounds_are_refused(interval, misses):
    with pytest.raises(InvalidArgument):
        check_heartbeat(interval, misses)
    check_heartbeat(0.1, 2)
    check_heartbeat(10.0, 30)
