"""Two real daemons paired over two paths, inside test-made network namespaces.

Nodes a and b live in their own namespaces joined by two veth pairs: the main path
(10.233.1.0/24) and the auxiliary path (10.233.2.0/24). Each daemon has its own private
bus (both own the same bus name). The attacker is the test itself: it captures b's
datagrams as they arrive at a (an AF_PACKET socket in a's namespace), then sends altered
copies, made-up datagrams and replays from b's addresses (a socket in b's namespace).
"""

import asyncio
import json
import secrets
import struct
import time

import pytest
from dbus_fast.aio import MessageBus

from applianced.constants import PEER_INTERFACE, PEER_PATH
from applianced.peer import protocol
from tests.conftest import POLICY
from tests.support.daemon import Daemon
from tests.support.netns import Namespace, capture_datagrams, ip, link, send_datagrams
from tests.support.private_bus import PrivateBus
from tests.support.signals import watch_properties

pytestmark = pytest.mark.netns

A_MAIN, B_MAIN = "10.233.1.1", "10.233.1.2"
A_AUX, B_AUX = "10.233.2.1", "10.233.2.2"
A_MAIN6, B_MAIN6 = "fd00:233:1::1", "fd00:233:1::2"
PORT = 7790
KEY = "the-pair-key-of-the-netns-tier-0123456789"
# Waits for events (a handshake, a path declared down); the bound only stops a broken run.
WAIT = 40.0


@pytest.fixture
def pair_of_namespaces():
    a, b = Namespace("peer-a"), Namespace("peer-b")
    try:
        link(a, [f"{A_MAIN}/24", f"{A_MAIN6}/64"], b, [f"{B_MAIN}/24", f"{B_MAIN6}/64"], names=("rep-a", "rep-b"))
        link(a, [f"{A_AUX}/24"], b, [f"{B_AUX}/24"], names=("aux-a", "aux-b"))
        yield a, b
    finally:
        a.delete()
        b.delete()


@pytest.fixture
def second_bus():
    private = PrivateBus(POLICY)
    private.start()
    yield private
    private.stop()


@pytest.fixture
def nodes(pair_of_namespaces, bus, second_bus, tmp_path):
    """Daemons a and b started in their namespaces (not paired yet); stopped at the end."""
    ns_a, ns_b = pair_of_namespaces
    a = node("a", bus.address, ns_a, tmp_path)
    b = node("b", second_bus.address, ns_b, tmp_path)
    a.start()
    b.start()
    yield a, b
    for daemon in (a, b):
        if daemon.process:
            daemon.stop()


def node(name, bus_address, namespace, tmp_path):
    directory = tmp_path / name
    directory.mkdir()
    return Daemon(bus_address, directory, exec_prefix=namespace.exec_prefix)


def status(daemon):
    shown = daemon.cli("--json", "pair", "status")
    assert shown.returncode == 0, shown.stderr
    return shown.json()


def paths_up(daemon):
    return {path["role"]: path["up"] for path in status(daemon)["paths"]}


def wait_until(condition, what, shown=lambda: ""):
    """Poll ``condition`` until it holds; on a timeout say what was awaited and ``shown()``."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not seen within {WAIT} s: {what} {shown()}"
        time.sleep(0.5)


def pair(daemon, peer_main, peer_aux, key=KEY):
    done = daemon.cli("pair", "create", peer_main, "--aux-address", peer_aux, input=key + "\n")
    assert done.returncode == 0, done.stderr


def both_paths_connected(daemon):
    shown = status(daemon)
    return shown["connected"] and all(path["up"] for path in shown["paths"])


def send_from(namespace, source, datagrams):
    send_datagrams(namespace, source, A_MAIN, PORT, datagrams)


def announced_connected(bus_address, action, connected):
    """Run ``action`` and return the PropertiesChanged of the Peer object that announces
    ``Connected == connected``."""

    async def watch():
        watcher = await MessageBus(bus_address=bus_address).connect()
        seen = asyncio.get_running_loop().create_future()

        def on_message(message):
            if message.member == "PropertiesChanged" and message.path == PEER_PATH and not seen.done():
                interface, changed, _ = message.body
                if interface == PEER_INTERFACE and "Connected" in changed and changed["Connected"].value == connected:
                    seen.set_result({name: value.value for name, value in changed.items()})

        watcher.add_message_handler(on_message)
        await watch_properties(watcher, PEER_PATH)
        await asyncio.to_thread(action)
        try:
            return await asyncio.wait_for(seen, WAIT)
        finally:
            watcher.disconnect()

    return asyncio.run(watch())


def forged_datagrams(captured, b_node):
    """Altered copies of captured datagrams, and made-up ones under b's name."""
    altered = []
    for datagram in captured[:5]:
        copy = bytearray(datagram)
        copy[protocol.HEADER.size] ^= 0x40  # first payload byte; the tag no longer matches
        altered.append(bytes(copy))
    # A HELLO, and a REQUEST in the current session (an unknown one would be "stale").
    session = protocol.read_header(captured[0]).session
    made_up = [
        protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, kind, protocol.node_tag(b_node), session, counter, 0)
        + b"\x80"
        + secrets.token_bytes(protocol.TAG_SIZE)
        for kind, counter in ((protocol.MessageType.HELLO, 0), (protocol.MessageType.REQUEST, 2**40))
    ]
    return altered + made_up


def test_two_daemons_pair_survive_a_path_and_a_restart_and_ignore_attacks(
    pair_of_namespaces, nodes, second_bus, tmp_path
):
    ns_a, ns_b = pair_of_namespaces
    a, b = nodes
    a_node = a.cli("--json", "status").json()[0]["node_id"]
    b_node = b.cli("--json", "status").json()[0]["node_id"]
    pair(a, B_MAIN, B_AUX)
    pair(b, A_MAIN, A_AUX)

    # Connected over both paths; each learnt the other's node id.
    wait_until(lambda: both_paths_connected(a) and both_paths_connected(b), "connected over both paths")
    assert status(a)["peer_node_id"] == b_node and status(b)["peer_node_id"] == a_node
    assert json.loads((a.state_dir / "pair.json").read_text())["peer_node"] == b_node
    wait_until(lambda: status(a)["clock_offset"] is not None, "a clock offset estimate")
    shown = status(a)
    assert abs(shown["clock_offset"]) < 1.0  # one host clock: no warning
    assert all(path["rtt"] is not None for path in shown["paths"])
    text = a.cli("pair", "status")
    assert "connected:     yes" in text.stdout and "aux 10.233.2.2: up" in text.stdout
    assert "warning" not in text.stderr

    # The main path goes down: still connected, over the auxiliary path.
    ip("link", "set", "rep-a", "down", netns=ns_a.name)
    wait_until(lambda: paths_up(a) == {"main": False, "aux": True}, "main path down on a")
    assert status(a)["connected"] and status(b)["connected"]
    ip("link", "set", "rep-a", "up", netns=ns_a.name)
    wait_until(lambda: both_paths_connected(a), "main path up again")

    # The attacker records b's datagrams arriving at a over the main path.
    captured = capture_datagrams(ns_a, "rep-a", PORT, 3)
    assert len(captured) >= 2
    before = status(a)
    send_from(ns_b, B_MAIN, captured)
    forged = forged_datagrams(captured, b_node)
    send_from(ns_b, B_MAIN, forged)
    garbage = [b"", b"APLK", secrets.token_bytes(200)]
    send_from(ns_b, B_MAIN, garbage)
    after_attack = {
        "replayed": before["drops"]["replayed"] + len(captured),
        "forged": before["drops"]["forged"] + len(forged),
        "malformed": before["drops"]["malformed"] + len(garbage),
    }
    wait_until(
        lambda: all(status(a)["drops"][reason] == count for reason, count in after_attack.items()),
        f"drops counted as {after_attack}",
        lambda: status(a)["drops"],
    )
    after = status(a)
    assert after["connected"] and after["session_started"] == before["session_started"]
    assert after["peer_node_id"] == b_node
    assert "peer link dropped a datagram from 10.233.1.2: forged" in a.log_text()
    assert KEY not in a.log_text() and KEY not in b.log_text()

    # A third node where b was: another key, then the right key but another node id.
    b.stop()
    wait_until(lambda: not status(a)["connected"], "a sees b gone")
    c = node("c", second_bus.address, ns_b, tmp_path)
    c.start()
    try:
        pair(c, A_MAIN, A_AUX, key="another-key-of-a-stranger-0123456789")
        unknown = status(a)["drops"]["unknown-peer"]
        wait_until(lambda: status(c)["drops"]["forged"] >= 2, "c refuses a's handshakes")
        wait_until(lambda: status(a)["drops"]["unknown-peer"] >= unknown + 2, "a refuses c's handshakes")
        assert c.cli("pair", "delete").returncode == 0
        pair(c, A_MAIN, A_AUX)
        wait_until(lambda: status(c)["drops"]["unknown-peer"] >= 2, "c refuses a node paired elsewhere")
        assert not status(a)["connected"] and not status(c)["connected"]
        assert status(a)["peer_node_id"] == b_node and status(c)["peer_node_id"] == ""
    finally:
        c.stop()

    # b comes back: a new session by itself, and the old recordings are stale now.
    b.start()
    wait_until(lambda: both_paths_connected(a) and both_paths_connected(b), "reconnected after the restart")
    renewed = status(a)
    assert renewed["session_started"] > before["session_started"]
    send_from(ns_b, B_MAIN, captured)
    stale = renewed["drops"]["stale-session"] + len(captured)
    wait_until(lambda: status(a)["drops"]["stale-session"] >= stale, "old recordings dropped as stale")
    assert status(a)["session_started"] == renewed["session_started"] and status(a)["connected"]


def test_both_nodes_report_a_path_whose_link_is_cut(pair_of_namespaces, nodes):
    _, ns_b = pair_of_namespaces
    a, b = nodes
    pair(a, B_MAIN, B_AUX)
    pair(b, A_MAIN, A_AUX)
    wait_until(lambda: both_paths_connected(a) and both_paths_connected(b), "connected over both paths")
    # The auxiliary link is cut at b's end: both ends see that path down, the link stays up.
    ip("link", "set", "aux-b", "down", netns=ns_b.name)
    wait_until(lambda: paths_up(a) == {"main": True, "aux": False}, "aux down on a")
    wait_until(lambda: paths_up(b) == {"main": True, "aux": False}, "aux down on b")
    assert status(a)["connected"] and status(b)["connected"]
    # Both paths cut: disconnected on both sides (announced), and back by itself when one returns.
    changed = announced_connected(a.bus_address, lambda: ip("link", "set", "rep-b", "down", netns=ns_b.name), False)
    assert [up for _, _, up, _, _ in changed["Paths"]] == [False, False]
    wait_until(lambda: not status(b)["connected"], "disconnected on b")
    changed = announced_connected(a.bus_address, lambda: ip("link", "set", "aux-b", "up", netns=ns_b.name), True)
    assert [up for _, _, up, _, _ in changed["Paths"]] == [False, True]
    wait_until(lambda: status(a)["connected"] and paths_up(a) == {"main": False, "aux": True}, "back over aux")


def test_an_ipv6_main_path_beside_an_ipv4_auxiliary_one(nodes):
    a, b = nodes
    pair(a, B_MAIN6, B_AUX)
    pair(b, A_MAIN6, A_AUX)
    wait_until(lambda: both_paths_connected(a) and both_paths_connected(b), "connected over IPv6 and IPv4")
    assert [path["address"] for path in status(a)["paths"]] == [B_MAIN6, B_AUX]
    # Nothing of the other node's traffic fails authentication or framing.
    drops = status(a)["drops"]
    assert drops["forged"] == drops["malformed"] == drops["unknown-peer"] == 0


def test_forged_handshakes_change_nothing_on_an_unconnected_node(pair_of_namespaces, bus, tmp_path):
    ns_a, ns_b = pair_of_namespaces
    a = node("a", bus.address, ns_a, tmp_path)
    a.start()
    try:
        pair(a, B_MAIN, B_AUX)
        hello = protocol.Hello(secrets.token_bytes(32), "intruder", "")
        header = protocol.Header(protocol.MessageType.HELLO, protocol.node_tag("intruder"), 1, 0, time.time_ns())
        wrong_key = protocol.seal(protocol.handshake_key(b"x" * 32), header, hello)
        send_from(ns_b, B_MAIN, [wrong_key] * 3)
        wait_until(lambda: status(a)["drops"]["forged"] == 3, "three forged handshakes")
        shown = status(a)
        assert not shown["connected"] and shown["peer_node_id"] == "" and shown["last_message"] is None
        assert struct.unpack("!4s", wrong_key[:4])[0] == protocol.MAGIC
    finally:
        a.stop()
