"""A failover look that is held up does not decide on the silence it caused.

A look sends its echo to the ping nodes and its beat when it begins, and decides at its end.
After a 64-LUN takeover the active node's look waited seconds for a thread, found its ping
node's last reply older than the deadline, and stopped serving with its peer dead. The
decision itself is proven in test_failover_decision.py; the looks end to end in
tests/netns/test_failover.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from types import SimpleNamespace

from applianced.failover import service as failover_service
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


def active_node(tmp_path, monkeypatch, connections_read: float):
    """An active node whose peer is dead and whose ping node has just answered; reading
    the clients' connections takes ``connections_read`` seconds."""
    node = failover_service.Failover(tmp_path, Engine(), Peer(), Replication())
    node.record = FailoverRecord(role="active", interval=0.2, misses=2)  # a deadline of 0.4 s

    def established(vips):
        time.sleep(connections_read)
        return ()

    monkeypatch.setattr(failover_service.tickle, "established", established)
    decisions = []

    async def act(decision) -> None:
        decisions.append(decision)

    node._act = act
    node._last_reply = time.monotonic()
    return node, decisions


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
