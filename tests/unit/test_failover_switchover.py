"""A planned switchover keeps the VIPs, their portals held, while the copies change hands.

The old order (VIPs removed, then the hand-over) left the clients' SYNs unanswered once
their own timers dropped a session: with 64 LUNs the next SYN came up to 8 s after the
peer served. The order of the steps, against fakes, is pinned here, and the clients'
connections read once the portals are held reach the peer, which resets them (in a
five-LUN VM run the new active node reset none: it knew none from the beats). What the held
portal's rules do to a connection is proven in tests/netns/test_failover_network.py, the
switchover end to end in tests/vm/test_failover.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from applianced import decoding
from applianced.errors import Incomplete, KernelError, Unreachable
from applianced.failover import messages as m
from applianced.failover import service as failover_service
from applianced.failover import tickle
from applianced.failover.addresses import VirtualAddress
from applianced.failover.records import FailoverRecord
from applianced.state import Portal

VIP = VirtualAddress("data0", "10.0.0.10", 24)
CLIENT = tickle.Connection("10.0.0.10", 3260, "10.0.0.77", 40123)


class Peer:
    """Answers the old active node's requests: the copies can take over, and it did."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.bodies: dict[str, bytes] = {}
        self.silent_on: set[str] = set()

    def handle(self, kind, handler) -> None:
        pass

    async def ask(self, kind: str, body: bytes, timeout: float) -> bytes:
        self.events.append(("peer", kind))
        self.bodies[kind] = body
        if kind in self.silent_on:
            raise Unreachable(f"no answer to {kind} within {timeout:.0f} s")
        answer = m.Problems(()) if kind == m.CAN_TAKE_OVER else m.Done()
        return failover_service._pack(answer)


class Engine:
    def __init__(self, events: list) -> None:
        self.events = events
        self.config = SimpleNamespace(
            targets={"t1": SimpleNamespace(enabled=True)},
            portals=(Portal("0.0.0.0", 3260), Portal("10.0.0.1", 3261, ("other",))),
        )

    def add_guard(self, guard) -> None:
        pass

    async def hold_portals(self, portals) -> None:
        self.events.append(("hold", tuple(portals)))

    async def set_targets_enabled(self, names, enabled: bool) -> None:
        self.events.append(("enabled" if enabled else "disabled", tuple(names)))


class Replication:
    def __init__(self, events: list, fails: bool = False) -> None:
        self.events = events
        self.fails = fails

    def halves(self) -> list:
        return [SimpleNamespace(disk="d1", peer_disk="d1", role="source", state=1)]

    async def hand_over(self, disks) -> None:
        self.events.append(("hand over", tuple(disks)))
        if self.fails:
            raise KernelError("the peer's copy of d1 did not start")


def active_node(tmp_path, monkeypatch, replication_fails: bool = False):
    events: list = []
    node = failover_service.Failover(
        tmp_path, Engine(events), Peer(events), Replication(events, fails=replication_fails)
    )
    node.record = FailoverRecord(addresses=(VIP,), targets=("t1",), role="active")
    node._protected_sources = lambda: ["d1"]
    for action in ("add", "remove"):
        monkeypatch.setattr(
            failover_service.addresses, action, lambda vip, action=action: events.append((action, vip.address))
        )
    monkeypatch.setattr(failover_service.announce, "announce", lambda vip, count: None)

    def established(vips):
        events.append(("connections read", tuple(vips)))
        return (CLIENT,)

    monkeypatch.setattr(failover_service.tickle, "established", established)
    return node, events


def test_the_vips_stay_held_until_the_copies_changed_hands(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch)

    asyncio.run(node.switchover())

    assert events == [
        ("peer", m.CAN_TAKE_OVER),
        # Held before the targets' sessions close: no FIN or RST reaches a client.
        ("hold", (("10.0.0.10", 3260),)),
        # Read once held (none can come or go), before the sessions close.
        ("connections read", ("10.0.0.10",)),
        ("disabled", ("t1",)),
        ("hand over", ("d1",)),
        # Gone before the peer adds them; the rules only once they are gone.
        ("remove", "10.0.0.10"),
        ("peer", m.TAKE_OVER),
        ("hold", ()),
    ]
    assert node.record.role == "passive"
    # The peer resets the connections read then.
    hand_over = decoding.unpack(node.peer.bodies[m.TAKE_OVER], m.HandOver, "a HandOver message")
    assert hand_over.connections == (CLIENT,)


def test_the_new_active_node_resets_the_connections_it_was_handed(tmp_path, monkeypatch):
    node, _ = active_node(tmp_path, monkeypatch)
    node.record = FailoverRecord(addresses=(VIP,), targets=("t1",), role="passive")
    node._local_copies = lambda: []
    reset = []
    monkeypatch.setattr(failover_service.tickle, "reset", lambda connections: reset.append(connections) or 1)

    asyncio.run(node._on_take_over(m.HandOver("switchover by the administrator", (CLIENT,))))

    assert reset == [(CLIENT,)]
    assert node.record.role == "active"


def test_a_hand_over_that_fails_serves_again_with_nothing_held(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch, replication_fails=True)

    with pytest.raises(KernelError, match="did not start"):
        asyncio.run(node.switchover())

    assert events[-4:] == [("hand over", ("d1",)), ("hold", ()), ("enabled", ("t1",)), ("add", "10.0.0.10")]
    assert ("remove", "10.0.0.10") not in events
    assert node.record.role == "active"


def test_vips_that_cannot_be_removed_stay_held_and_the_peer_is_not_asked_to_serve(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch)

    def remove(vip):
        events.append(("remove", vip.address))
        raise KernelError("RTNETLINK answers: Operation not permitted")

    monkeypatch.setattr(failover_service.addresses, "remove", remove)
    with pytest.raises(Incomplete, match="could not remove its virtual IPs"):
        asyncio.run(node.switchover())

    # The peer holds the sources but serves nothing: two holders of the VIP never exist,
    # and this node's held portals keep refusing its clients rather than serving them.
    assert events[-2:] == [("hand over", ("d1",)), ("remove", "10.0.0.10")]
    assert ("peer", m.TAKE_OVER) not in events and ("hold", ()) not in events
    assert node.record.role == "passive"


def test_a_peer_that_does_not_confirm_serving_leaves_the_switchover_incomplete(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch)
    node.peer.silent_on.add(m.TAKE_OVER)

    with pytest.raises(Incomplete, match="did not confirm that it serves them"):
        asyncio.run(node.switchover())

    # The VIPs are gone from here, so the held portals' rules go too.
    assert events[-3:] == [("remove", "10.0.0.10"), ("peer", m.TAKE_OVER), ("hold", ())]
    assert node.record.role == "passive"
