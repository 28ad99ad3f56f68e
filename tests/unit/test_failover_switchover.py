"""A planned switchover keeps the VIPs, their portals held, while the copies change hands.

The old order (VIPs removed, then the hand-over) left the clients' SYNs unanswered once
their own timers dropped a session: with 64 LUNs the next SYN came up to 8 s after the
peer served. The order of the steps, against fakes, is pinned here; what the held
portal's rules do to a connection is proven in tests/netns/test_failover_network.py, the
switchover end to end in tests/vm/test_failover.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from applianced.errors import KernelError
from applianced.failover import messages as m
from applianced.failover import service as failover_service
from applianced.failover.addresses import VirtualAddress
from applianced.failover.records import FailoverRecord
from applianced.state import Portal

VIP = VirtualAddress("data0", "10.0.0.10", 24)


class Peer:
    """Answers the old active node's requests: the copies can take over, and it did."""

    def __init__(self, events: list) -> None:
        self.events = events

    def handle(self, kind, handler) -> None:
        pass

    async def ask(self, kind: str, body: bytes, timeout: float) -> bytes:
        self.events.append(("peer", kind))
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
    return node, events


def test_the_vips_stay_held_until_the_copies_changed_hands(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch)

    asyncio.run(node.switchover())

    assert events == [
        ("peer", m.CAN_TAKE_OVER),
        # Held before the targets' sessions close: no FIN or RST reaches a client.
        ("hold", (("10.0.0.10", 3260),)),
        ("disabled", ("t1",)),
        ("hand over", ("d1",)),
        # Gone before the peer adds them; the rules only once they are gone.
        ("remove", "10.0.0.10"),
        ("peer", m.TAKE_OVER),
        ("hold", ()),
    ]
    assert node.record.role == "passive"


def test_a_hand_over_that_fails_serves_again_with_nothing_held(tmp_path, monkeypatch):
    node, events = active_node(tmp_path, monkeypatch, replication_fails=True)

    with pytest.raises(KernelError, match="did not start"):
        asyncio.run(node.switchover())

    assert events[-4:] == [("hand over", ("d1",)), ("hold", ()), ("enabled", ("t1",)), ("add", "10.0.0.10")]
    assert ("remove", "10.0.0.10") not in events
    assert node.record.role == "active"
