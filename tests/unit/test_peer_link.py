"""Two peer-link endpoints in one process over loopback (127.0.0.1 and 127.0.0.2)."""

import asyncio

import pytest

from applianced.peer import link, protocol
from applianced.peer.link import PeerLink, PeerRefused, PeerUnreachable
from applianced.peer.pairing import PairRecord
from tests.support.daemon import free_udp_port

KEY = bytes(range(32))
WAIT = 15.0


class Node:
    def __init__(self, node_id, own, peer, port, key=KEY, peer_node=""):
        self.identified = []
        record = PairRecord(peer, port, key, local_addresses=(own,), peer_node=peer_node)
        self.link = PeerLink(record, node_id, lambda: None, self.identified.append)

    async def __aenter__(self):
        await self.link.start()
        return self

    async def __aexit__(self, *exc):
        await self.link.close()


def pair_of_links(port, a_options=None, b_options=None):
    """node-a on 127.0.0.1 and node-b on 127.0.0.2, each the other's peer."""
    return (
        Node("node-a", "127.0.0.1", "127.0.0.2", port, **(a_options or {})),
        Node("node-b", "127.0.0.2", "127.0.0.1", port, **(b_options or {})),
    )


def run_connected(scenario):
    """Run ``scenario(a, b)`` once node-a and node-b are connected over loopback."""

    async def run():
        first, second = pair_of_links(free_udp_port())
        async with first as a, second as b:
            await until(lambda: a.link.status().connected and b.link.status().connected)
            await scenario(a, b)

    asyncio.run(run())


async def until(condition, timeout=WAIT):
    """Wait for ``condition()`` to hold; a bounded wait for an event, not a speed check."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_two_links_connect_answer_requests_and_learn_each_other():
    async def scenario(a, b):
        calls = []

        async def echo(body):
            calls.append(body)
            return body[::-1]

        async def broken(body):
            raise RuntimeError("boom")

        b.link.handle("echo", echo)
        b.link.handle("broken", broken)
        assert a.identified == ["node-b"] and b.identified == ["node-a"]
        assert await a.link.request("echo", b"abc") == b"cba"
        assert calls == [b"abc"]
        with pytest.raises(PeerRefused) as refused:
            await a.link.request("broken", b"")
        assert "boom" not in str(refused.value)
        await until(lambda: a.link.status().paths[0].rtt is not None)
        status = a.link.status()
        assert status.peer_node == "node-b" and status.paths[0].up
        # One clock on both ends: the estimate is near zero.
        assert status.clock_offset is not None and abs(status.clock_offset) < 0.5
        assert sum(status.drops.values()) == 0

    run_connected(scenario)


def test_captured_datagrams_replayed_are_counted_and_ignored():
    async def scenario(a, b):
        captured = []
        receive = b.link.received

        def tap(datagram, source):
            captured.append(datagram)
            receive(datagram, source)

        b.link.received = tap
        executed = []

        async def count(body):
            executed.append(body)
            return b""

        b.link.handle("count", count)
        await a.link.request("count", b"once")
        before = b.link.status()
        for datagram in captured:
            receive(datagram, "127.0.0.1")
        after = b.link.status()
        assert executed == [b"once"]
        assert after.drops["replayed"] == before.drops["replayed"] + len(captured)
        assert after.session_started == before.session_started

    run_connected(scenario)


def test_a_wrong_key_or_a_node_paired_elsewhere_never_connects():
    async def scenario():
        port = free_udp_port()
        async with (
            Node("node-a", "127.0.0.1", "127.0.0.2", port) as a,
            Node("node-c", "127.0.0.2", "127.0.0.1", port, key=bytes(32)) as c,
        ):
            await until(lambda: a.link.status().drops["forged"] >= 2 and c.link.status().drops["forged"] >= 2)
            assert not a.link.status().connected and a.identified == []
        # Paired to node-b: node-c is refused though it has the key, and it refuses node-a.
        async with (
            Node("node-a", "127.0.0.1", "127.0.0.2", port, peer_node="node-b") as a,
            Node("node-c", "127.0.0.2", "127.0.0.1", port) as c,
        ):
            await until(
                lambda: a.link.status().drops["unknown-peer"] >= 2 and c.link.status().drops["unknown-peer"] >= 2
            )
            assert not a.link.status().connected and not c.link.status().connected
            assert c.identified == []
            with pytest.raises(PeerUnreachable):
                await c.link.request("anything", b"")

    asyncio.run(scenario())


def test_a_restarted_endpoint_gets_a_new_session_by_itself():
    async def scenario():
        port = free_udp_port()
        async with Node("node-a", "127.0.0.1", "127.0.0.2", port) as a:
            async with Node("node-b", "127.0.0.2", "127.0.0.1", port) as b:
                await until(lambda: a.link.status().connected and b.link.status().connected)
                first = a.link.status().session_started
            async with Node("node-b", "127.0.0.2", "127.0.0.1", port, peer_node="node-a") as b:
                await until(lambda: b.link.status().connected and a.link.status().session_started != first)
                await until(lambda: a.link.status().connected)

    asyncio.run(scenario())


def test_oversized_requests_and_answers_are_refused():
    async def scenario(a, b):
        with pytest.raises(ValueError, match="send it in parts"):
            await a.link.request("bitmap", b"\x00" * protocol.MAX_PAYLOAD)

        async def whole_bitmap(body):
            return b"\xff" * protocol.MAX_PAYLOAD

        b.link.handle("bitmap", whole_bitmap)
        with pytest.raises(PeerRefused, match="too large"):
            await a.link.request("bitmap", b"")

    run_connected(scenario)


def test_a_retried_request_runs_its_handler_once():
    async def scenario(a, b):
        runs = []

        async def setup(body):
            runs.append(body)
            return b"done"

        b.link.handle("volume-setup", setup)
        # b's first answer is lost on the way: a retries, b answers from its cache.
        transmit = b.link._transmit
        lost = []

        def lose_first_response(index, datagram):
            if protocol.read_header(datagram).type is protocol.MessageType.RESPONSE and not lost:
                lost.append(datagram)
                return
            transmit(index, datagram)

        b.link._transmit = lose_first_response
        assert await a.link.request("volume-setup", b"vol1", timeout=0.5) == b"done"
        assert lost and runs == [b"vol1"]

    run_connected(scenario)


def test_a_request_waits_for_a_link_that_drops_on_the_way():
    """The peer falls silent longer than a path's DEAD_AFTER (a guest starved of CPU)
    while it runs the request: the link goes down and comes back, and the request, still
    within its attempts, gets its answer instead of failing as the link went down.

    Attempts of 2 s: the third starts at 4 s, with the link down since 3.5 s and back
    (both sides' next tick) by 5.5 s."""
    silence = link.DEAD_AFTER + 1.0

    async def scenario(a, b):
        async def slow_setup(body):
            await asyncio.sleep(silence)
            return b"done"

        b.link.handle("volume-setup", slow_setup)
        transmit = b.link._transmit
        b.link._transmit = lambda index, datagram: None
        asyncio.get_running_loop().call_later(silence, setattr, b.link, "_transmit", transmit)
        went_down = []

        async def watch():
            await until(lambda: not a.link.status().connected)
            went_down.append(True)

        watching = asyncio.ensure_future(watch())
        assert await a.link.request("volume-setup", b"vol1", timeout=2.0, attempts=5) == b"done"
        assert went_down, "the link never went down: the test did not test a lost link"
        await watching

    run_connected(scenario)


def test_a_request_fails_at_once_while_the_link_is_down():
    async def scenario():
        async with Node("node-a", "127.0.0.1", "127.0.0.2", free_udp_port()) as a:
            started = asyncio.get_running_loop().time()
            with pytest.raises(PeerUnreachable, match="not connected"):
                await a.link.request("volume-setup", b"vol1", timeout=30.0, attempts=3)
            assert asyncio.get_running_loop().time() - started < 30.0

    asyncio.run(scenario())
