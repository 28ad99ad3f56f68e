"""A failover look that is held up does not decide on the silence it caused, and a passive
node's look asks who holds the virtual IPs before its takeover is due.

A look sends its echo to the ping nodes and its beat when it begins, and decides at its end.
After a 64-LUN takeover the active node's look waited seconds for a thread, found its ping
node's last reply older than the deadline, and stopped serving with its peer dead. A
takeover must know that nobody answers for its VIPs: asked at the takeover, that cost every
crash two probes' wait. The decision itself is proven in test_failover_decision.py; the
looks end to end in tests/netns/test_failover.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from types import SimpleNamespace

from applianced.failover import service as failover_service
from applianced.failover.addresses import VirtualAddress
from applianced.failover.decision import Action
from applianced.failover.records import FailoverRecord
from applianced.peer.link import PeerUnreachable


class Peer:
    def handle(self, kind, handler) -> None:
        pass

    async def request(self, *args, **kwargs) -> bytes:
        raise PeerUnreachable("the peer link is not connected")


class Engine:
    config = SimpleNamespace(targets={})

    def add_guard(self, guard) -> None:
        pass


class Replication:
    def halves(self) -> list:
        return []


def recorded_decisions(node) -> list:
    """The decisions of ``node``'s looks, recorded instead of acted on."""
    decisions = []

    async def act(decision) -> None:
        decisions.append(decision)

    node._act = act
    return decisions


def active_node(tmp_path, monkeypatch, connections_read: float):
    """An active node whose peer is dead and whose ping node has just answered; reading
    the clients' connections takes ``connections_read`` seconds."""
    node = failover_service.Failover(tmp_path, Engine(), Peer(), Replication())
    node.record = FailoverRecord(role="active", interval=0.2, misses=2)  # a deadline of 0.4 s

    def established(vips):
        time.sleep(connections_read)
        return ()

    monkeypatch.setattr(failover_service.tickle, "established", established)
    node._last_reply = time.monotonic()
    return node, recorded_decisions(node)


def test_a_look_held_up_past_two_intervals_decides_nothing(tmp_path, monkeypatch):
    node, decisions = active_node(tmp_path, monkeypatch, connections_read=0.6)

    asyncio.run(node.tick())

    assert decisions == []
    assert node.counters["stalls"] == 1


def test_a_look_on_time_decides(tmp_path, monkeypatch):
    node, decisions = active_node(tmp_path, monkeypatch, connections_read=0.0)

    asyncio.run(node.tick())

    assert [decision.action for decision in decisions] == [Action.STAY]
    assert node.counters["stalls"] == 0


def test_a_look_does_not_wait_behind_the_daemons_threads(tmp_path, monkeypatch):
    node, decisions = active_node(tmp_path, monkeypatch, connections_read=0.0)

    async def while_the_daemons_threads_are_busy():
        # As a takeover's clean-up stopping 64 export servers: more work than threads.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(2))
        busy = [asyncio.ensure_future(asyncio.to_thread(time.sleep, 0.5)) for _ in range(6)]
        await asyncio.sleep(0.05)
        await node.tick()
        await asyncio.gather(*busy)

    asyncio.run(while_the_daemons_threads_are_busy())

    assert [decision.action for decision in decisions] == [Action.STAY]


def test_the_beats_go_on_while_a_role_change_holds_the_lock(tmp_path, monkeypatch):
    node, decisions = active_node(tmp_path, monkeypatch, connections_read=0.0)

    async def during_a_switchover():
        async with node._lock:  # as a switchover's hand-over holds it
            for _ in range(3):
                await asyncio.wait_for(node.tick(), 1.0)

    asyncio.run(during_a_switchover())

    assert node.counters["beats_sent"] == 3
    assert decisions == []


def passive_node(tmp_path, monkeypatch, holders: list[str | None]):
    """A passive node whose peer went silent just past the deadline (its ping node answers,
    its copies are current); each probe for its VIP takes 0.3 s and answers the next of
    ``holders`` (a MAC, or None: nobody). The moments the probes began are returned."""
    node = failover_service.Failover(tmp_path, Engine(), Peer(), Replication())
    vip = VirtualAddress("eth0", "10.60.0.100", 24)
    node.record = FailoverRecord(role="passive", interval=0.2, misses=2, addresses=(vip,))  # deadline 0.4 s
    probes = []

    def in_use(vip):
        probes.append(time.monotonic())
        time.sleep(0.3)
        return holders.pop(0)

    monkeypatch.setattr(failover_service.announce, "in_use", in_use)
    node._last_reply = time.monotonic() + 60  # the ping node answers throughout
    node._copies_current = True  # in sync when the peer was last heard
    node._peer_heard = time.monotonic() - 0.45
    return node, recorded_decisions(node), probes


def looks_until_the_takeover_is_due(node) -> float:
    """Two looks, an interval apart: the first as the peer falls silent, the second when a
    takeover is due. When the second began."""

    async def looks() -> float:
        await node.tick()
        await asyncio.sleep(node.record.interval)
        due = time.monotonic()
        await node.tick()
        return due

    return asyncio.run(looks())


def test_a_passive_node_asks_who_holds_its_addresses_as_its_peer_falls_silent(tmp_path, monkeypatch):
    node, decisions, probes = passive_node(tmp_path, monkeypatch, holders=[None])

    due = looks_until_the_takeover_is_due(node)

    assert [decision.action for decision in decisions] == [Action.STAY, Action.TAKE_OVER]
    assert len(probes) == 1 and probes[0] < due, "the takeover waited for a probe it could have asked before"


def test_an_address_held_as_the_peer_fell_silent_is_asked_again_at_the_takeover(tmp_path, monkeypatch):
    # As an isolated active node lets go of its VIPs when its own deadline passes.
    node, decisions, probes = passive_node(tmp_path, monkeypatch, holders=["52:54:00:60:00:01", None])

    looks_until_the_takeover_is_due(node)

    assert [decision.action for decision in decisions] == [Action.STAY, Action.TAKE_OVER]
    assert len(probes) == 2


def test_an_address_still_held_at_the_takeover_refuses_it(tmp_path, monkeypatch):
    holder = "52:54:00:60:00:01"
    node, decisions, _ = passive_node(tmp_path, monkeypatch, holders=[holder, holder])

    looks_until_the_takeover_is_due(node)

    assert [decision.action for decision in decisions] == [Action.STAY, Action.REFUSE_TAKEOVER]
