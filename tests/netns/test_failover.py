"""Failover between two real daemons in namespaces: who holds the virtual IP, and why.

Nodes a and b (each a daemon on a private bus, with the in-memory kernel and the data
path's stand-in) are joined by a heartbeat link of their own and by the data network, a
bridge that also holds the ping node p. The pair's main path is the heartbeat link, its
auxiliary path the data network. Target t1's disk is mirrored from a to b in sync mode;
failover protects t1 behind one virtual IP. From p, a sampler asks every 20 ms who
answers for the virtual IP (an ARP probe; every holder on the network answers it) and
counts the moments with two holders: there must be none. What the storage does at a
takeover (LIO, md, the client's I/O) is proven in the VM tier.

The tests share one cluster and run in order, each starting from the state the previous
one left (named at its start).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from applianced.constants import PEER_DEFAULT_PORT
from applianced.peer.protocol import HEADER
from tests.support.daemon import INITIATOR, Daemon
from tests.support.fake_kernel import FakeKernel
from tests.support.netns import HeldConnection, Namespace, Switch, capture_datagrams, ip, link, send_datagrams
from tests.support.pair import PairedDaemons, wait

pytestmark = pytest.mark.netns

KEY = "failover-pair-key-of-the-netns-tier-0123456"
HEARTBEAT = {"a": "10.238.1.1", "b": "10.238.1.2"}
DATA = {"a": "10.238.0.1", "b": "10.238.0.2", "p": "10.238.0.9"}
VIP = "10.238.0.100"
# Fast beats so that every outage decides within a second or two.
INTERVAL, MISSES = 0.2, 3

SAMPLER = textwrap.dedent(
    """
    import json, select, socket, struct, sys, time
    from applianced.failover import announce
    vip = socket.inet_aton(sys.argv[1])
    sock, mac = announce._packet_socket("data")
    probe = announce._arp_frame(mac, announce.ARP_REQUEST, b"\\0" * 4, b"\\0" * 6, vip)
    samples, doubles, seen = 0, 0, set()
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        sock.send(probe)
        holders, deadline = set(), time.monotonic() + 0.02
        while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
            frame = sock.recv(2048)
            if len(frame) >= 42:
                operation, sender_mac, sender = struct.unpack_from("!6xH6s4s", frame, 14)
                if operation == announce.ARP_REPLY and sender == vip:
                    holders.add(sender_mac.hex(":"))
        samples += 1
        doubles += len(holders) > 1
        seen |= holders
    print(json.dumps({"samples": samples, "doubles": doubles, "holders": sorted(seen)}), flush=True)
    """
)


# Target t1 with one LUN and a CHAP-protected ACL, reached through a wildcard portal.
SETUP = f"""
disk create d1 64M
target create t1
portal create 0.0.0.0
lun add t1 d1 --lun 3
acl add t1 {INITIATOR}
"""
CHAP_SECRET = "s3cret-s3cret"


class Cluster:
    def __init__(self, root: Path) -> None:
        self.switch = Switch("fo-lan")
        self.namespaces = {name: Namespace(f"fo-{name}") for name in ("a", "b", "p")}
        a, b = self.namespaces["a"], self.namespaces["b"]
        link(a, [f"{HEARTBEAT['a']}/24"], b, [f"{HEARTBEAT['b']}/24"], names=("hb", "hb"))
        self.ports = {
            name: self.switch.plug(self.namespaces[name], "data", [f"{address}/24"]) for name, address in DATA.items()
        }
        self.daemons = PairedDaemons(root, self.namespaces, HEARTBEAT, DATA, KEY)
        self.nodes = self.daemons.nodes

    def mac(self, name: str) -> str:
        return json.loads(ip("-j", "link", "show", "data", netns=self.namespaces[name].name))[0]["address"]

    def holds_vip(self, name: str) -> bool:
        return VIP in ip("-br", "addr", "show", "data", netns=self.namespaces[name].name)

    def cable(self, name: str, interface: str, up: bool) -> None:
        """Pull (or plug back) one cable: the data one at the switch, the heartbeat one at the node."""
        if interface == "data":
            ip("link", "set", self.ports[name], "up" if up else "down", netns=self.switch.name)
        else:
            ip("link", "set", interface, "up" if up else "down", netns=self.namespaces[name].name)

    def close(self) -> None:
        self.daemons.close()
        for namespace in (*self.namespaces.values(), self.switch):
            namespace.delete()


def ctl(node: Daemon, *args: str, input: str | None = None):
    result = node.cli(*args, input=input)
    assert result.returncode == 0, result.stderr
    return result


def served(node: Daemon) -> dict[str, bool]:
    """The targets in the node's (in-memory) kernel, and whether each is enabled."""
    return {
        target["iqn"].rsplit(":", 1)[-1]: target["enabled"]
        for target in json.loads(node.kernel_file.read_text())["targets"]
    }


def status(node: Daemon) -> dict:
    return ctl(node, "--json", "failover", "status").json()


def role(node: Daemon) -> str:
    return status(node)["role"]


class Sampler:
    """Who answers for the virtual IP, asked from the ping node's namespace until stopped."""

    def __init__(self, cluster: Cluster) -> None:
        command = [*cluster.namespaces["p"].exec_prefix, sys.executable, "-c", SAMPLER, VIP]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> dict:
        out, _ = self.process.communicate("stop\n", timeout=30)
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = Cluster(tmp_path_factory.mktemp("failover"))
    try:
        a, b = made.nodes["a"], made.nodes["b"]
        ctl(a, "batch", input=SETUP)
        ctl(b, "portal", "create", "0.0.0.0")  # where b will serve t1 after a takeover
        ctl(a, "mirror", "create", "d1", "sync")
        wait(lambda: ctl(a, "mirror", "state", "d1").stdout.strip() == "1")
        yield made
    finally:
        made.close()


@pytest.fixture
def sampler(cluster):
    running = Sampler(cluster)
    yield running
    if running.process.poll() is None:
        running.process.kill()


def test_start_is_refused_with_what_is_missing_then_starts(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    refused = a.cli("failover", "start")
    assert refused.returncode != 0
    for missing in ("no virtual IP is configured", "no ping node is configured", "no target is protected"):
        assert missing in refused.stderr
    ctl(a, "failover", "add-address", "data", f"{VIP}/24")
    ctl(a, "failover", "add-ping-node", "10.238.0.99", "data")  # nobody there
    ctl(a, "failover", "protect", "t1")
    ctl(a, "failover", "heartbeat", str(INTERVAL), str(MISSES))
    (problem,) = ctl(a, "--json", "failover", "check").json()
    assert problem == "ping node 10.238.0.99 does not answer over data"
    before = (role(a), role(b), cluster.holds_vip("a"))
    assert a.cli("failover", "start").returncode != 0
    assert (role(a), role(b), cluster.holds_vip("a")) == before == ("stopped", "stopped", False)
    ctl(a, "failover", "remove-ping-node", "10.238.0.99")
    ctl(a, "failover", "add-ping-node", DATA["p"], "data")
    assert ctl(a, "--json", "failover", "check").json() == []
    ctl(a, "chap", "acl", "t1", INITIATOR, "--user", "alice", input=CHAP_SECRET + "\n")
    # b has a t1 of its own, on its own disk: the start would replace it, and is refused.
    ctl(b, "batch", input="disk create own 16M\ntarget create t1\nlun add t1 own\n")
    refused = a.cli("failover", "start")
    assert refused.returncode != 0
    assert "on the peer: target 't1' exists here, serving this node's own disk(s) own" in refused.stderr
    assert (role(a), role(b), cluster.holds_vip("a")) == ("stopped", "stopped", False)
    assert [lun["disk"] for lun in ctl(b, "--json", "lun", "list", "t1").json()] == ["own"]
    ctl(b, "batch", input="lun remove t1 0\ntarget delete t1\ndisk delete own\n")
    ctl(a, "failover", "start")
    assert (role(a), role(b)) == ("active", "passive")
    assert cluster.holds_vip("a") and not cluster.holds_vip("b")
    # b keeps t1 ready, disabled, with the same identity, on its copy, with the ACL's CHAP.
    wait(lambda: served(b).get("t1") is False)
    assert served(a)["t1"] is True
    (lun,) = ctl(b, "--json", "lun", "list", "t1").json()
    assert (lun["lun"], lun["disk"]) == (3, "d1")
    (acl,) = ctl(b, "--json", "acl", "list").json()
    assert (acl["initiator"], acl["auth"]) == (INITIATOR, "chap")
    kernel_b = b.kernel_file.read_text()
    assert (
        "alice" in kernel_b
        and CHAP_SECRET in kernel_b
        and CHAP_SECRET not in (b.log_file.read_text() + a.log_file.read_text())
    )
    # The passive node got the settings, and refuses changes while it runs.
    shown = status(b)
    assert shown["addresses"] == [f"{VIP}/24 on data"] and shown["heartbeat"] == {"interval": INTERVAL, "misses": 3}
    assert b.cli("failover", "add-address", "data", "10.238.0.101/24").returncode != 0
    # Its protected target is the active node's: changed only there.
    prepared = b.kernel_file.read_text()
    for change in (("acl", "remove", "t1", INITIATOR), ("lun", "remove", "t1", "3"), ("target", "delete", "t1")):
        refused = b.cli(*change)
        assert refused.returncode != 0
        assert "protected by failover" in refused.stderr and HEARTBEAT["a"] in refused.stderr
    assert b.kernel_file.read_text() == prepared
    ctl(b, "target", "create", "t9")  # what failover does not protect stays b's own
    ctl(b, "target", "delete", "t9")
    wait(lambda: status(b)["peer_heard"] and status(b)["ping_node_reached"])


# What LIO writes to <dbroot>/pr/aptpl_<serial> for one registration that holds the reservation.
SAVED_RESERVATION = f"""PR_REG_START: 0
initiator_fabric=iSCSI
initiator_node={INITIATOR}
sa_res_key=4660
res_holder=1
res_type=05
res_scope=00
res_all_tg_pt=0
mapped_lun=3
target_fabric=iSCSI
target_node=iqn.2026-11.org.applianced:t1
tpgt=1
port_rtpi=1
target_lun=3
PR_REG_END: 0
"""


def test_persistent_reservations_follow_to_the_passive_node(cluster):
    # a active, b passive, d1 mirrored to b's d1.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    (disk,) = ctl(a, "--json", "disk", "list").json()
    saved_on_a = FakeKernel(a.kernel_file).reservations_file(disk["serial"])
    kept_on_b = FakeKernel(b.kernel_file).reservations_file(disk["serial"])
    saved_on_a.parent.mkdir(exist_ok=True)
    saved_on_a.write_text(SAVED_RESERVATION)  # an initiator registered with APTPL on a
    wait(lambda: kept_on_b.exists() and kept_on_b.read_text() == SAVED_RESERVATION)
    saved_on_a.write_text("No Registrations or Reservations\n")  # and cleared them
    wait(lambda: kept_on_b.read_text() == "No Registrations or Reservations\n")
    saved_on_a.unlink()
    wait(lambda: not kept_on_b.exists())


def test_a_cut_heartbeat_link_changes_nothing(cluster, sampler):
    # a active, b passive: the beats go on over the data network.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    history = ctl(b, "--json", "failover", "history").json()
    cluster.cable("a", "hb", False)
    time.sleep(10 * INTERVAL * MISSES)
    assert (role(a), role(b)) == ("active", "passive")
    assert status(b)["peer_heard"]
    cluster.cable("a", "hb", True)
    assert ctl(b, "--json", "failover", "history").json() == history
    seen = sampler.stop()
    assert seen["doubles"] == 0 and seen["holders"] == [cluster.mac("a")]


def test_a_dead_daemon_with_its_address_still_up_is_not_taken_over(cluster):
    # a active: its daemon dies, its kernel still answers for the address.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    a.stop(signal.SIGKILL)
    try:
        wait(lambda: status(b)["decision"] == "refuse-takeover")
        assert "still answers" in status(b)["reason"]
        assert role(b) == "passive" and not cluster.holds_vip("b")
    finally:
        a.start()
    # Restarted with its address still configured: it goes on serving.
    wait(lambda: status(b)["peer_heard"])
    assert role(a) == "active" and cluster.holds_vip("a")


def flip_first_payload_byte(datagram: bytes) -> bytes:
    altered = bytearray(datagram)
    altered[HEADER.size] ^= 0x40  # the tag no longer matches
    return bytes(altered)


def replay_until_b_serves(cluster: Cluster, recorded: list[bytes]) -> float:
    """Send ``recorded`` and altered copies to b from a's address (taken by p) until b is
    active; when it became so (monotonic). Both kinds must be dropped by b's peer link."""
    b, p = cluster.nodes["b"], cluster.namespaces["p"]
    altered = [flip_first_payload_byte(datagram) for datagram in recorded]
    before = ctl(b, "--json", "pair", "status").json()["drops"]
    ip("addr", "add", f"{DATA['a']}/24", "dev", "data", netns=p.name)
    try:
        while role(b) != "active":
            send_datagrams(p, DATA["a"], DATA["b"], PEER_DEFAULT_PORT, recorded + altered)
        served = time.monotonic()
    finally:
        ip("addr", "del", f"{DATA['a']}/24", "dev", "data", netns=p.name)
        ip("neigh", "flush", "to", DATA["a"], netns=cluster.namespaces["b"].name)
    after = ctl(b, "--json", "pair", "status").json()["drops"]
    assert after["forged"] >= before["forged"] + len(altered)
    assert after["replayed"] + after["stale-session"] >= before["replayed"] + before["stale-session"] + len(recorded)
    return served


def test_an_isolated_active_node_stops_serving_and_the_peer_takes_over(cluster, sampler):
    # a active, with a client connection to the virtual IP (from p, to a stand-in for the
    # portal): both a's cables are pulled; it cannot reach b nor the ping node. Meanwhile
    # a's recorded datagrams are replayed to b, and forged ones sent.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    held = HeldConnection(cluster.namespaces["a"], cluster.namespaces["p"], VIP, 3260)
    try:
        wait(lambda: status(b)["client_connections"] == 1)  # b heard of it in a's beats
        # An attacker on the data network records a's datagrams to b (beats among them)...
        recorded = capture_datagrams(cluster.switch, cluster.ports["a"], PEER_DEFAULT_PORT, 2)
        assert len(recorded) >= 5
        cluster.cable("a", "hb", False)
        cluster.cable("a", "data", False)
        cut = time.monotonic()
        # ... and, a gone, sends them again from a's address, with altered copies: b hears
        # no beat in them and takes over all the same.
        took = replay_until_b_serves(cluster, recorded) - cut
        # b reset the client's connection at once: the client did not wait for a timeout.
        assert held.outcome(timeout=5) == "reset"
        assert status(b)["counters"]["connections_reset"] == 1
    finally:
        held.close()
    wait(lambda: role(a) == "passive")
    assert "isolated" in status(a)["reason"]
    assert cluster.holds_vip("b") and not cluster.holds_vip("a")
    assert (served(a)["t1"], served(b)["t1"]) == (False, True)
    # Back on the network, a hears that b took over after it: it stays passive, and its
    # copy of the disk is the copy again (b's resync overwrites what a alone wrote).
    cluster.cable("a", "data", True)
    cluster.cable("a", "hb", True)
    wait(lambda: status(a)["peer_heard"])
    wait(lambda: ctl(a, "--json", "mirror", "show", "d1").json()["role"] == "target")
    assert (role(a), role(b)) == ("passive", "active")
    seen = sampler.stop()
    assert seen["doubles"] == 0 and set(seen["holders"]) <= {cluster.mac("a"), cluster.mac("b")}
    event = ctl(b, "--json", "failover", "history").json()[-1]
    assert event["role"] == "active" and "silent" in event["reason"]
    print(f"takeover seen {took:.2f} s after the cut; steps: {event['steps']}")


def test_an_active_node_without_its_data_network_hands_over(cluster, sampler):
    # b active, a passive (its mirror resynced from b): b's data cable is pulled.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    wait(lambda: ctl(b, "mirror", "state", "d1").stdout.strip() == "1")
    wait(lambda: not status(a)["reason"].startswith("this node's copies"))
    cluster.cable("b", "data", False)
    wait(lambda: role(a) == "active")
    assert role(b) == "passive" and not cluster.holds_vip("b") and cluster.holds_vip("a")
    assert (served(a)["t1"], served(b)["t1"]) == (True, False)
    assert "data network is down" in ctl(b, "--json", "failover", "history").json()[-1]["reason"]
    cluster.cable("b", "data", True)
    seen = sampler.stop()
    assert seen["doubles"] == 0


def test_a_lost_ping_node_moves_nothing(cluster, sampler):
    # a active, b passive: the ping node goes away; both nodes lose it.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    cluster.cable("p", "data", False)
    try:
        wait(lambda: not status(a)["ping_node_reached"] and not status(b)["ping_node_reached"])
        time.sleep(5 * INTERVAL * MISSES)
        assert (role(a), role(b)) == ("active", "passive")
        assert "ping nodes are down" in status(a)["reason"]
    finally:
        cluster.cable("p", "data", True)
    wait(lambda: status(a)["ping_node_reached"])
    assert sampler.stop()["doubles"] == 0


HAMMER = textwrap.dedent(
    """
    import sys, threading, time
    from applianced.cli.client import Connection
    address, seconds = sys.argv[1], float(sys.argv[2])
    calls = []
    def hammer():
        connection, done = Connection.open(address), 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.call("org.applianced.Appliance1", "/org/applianced/Appliance1/failover",
                            "org.freedesktop.DBus.Properties", "GetAll", "s", ["org.applianced.Appliance1.Failover"])
            done += 1
        calls.append(done)
    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(sum(calls))
    """
)


def test_a_flood_of_bus_reads_costs_no_beat(cluster):
    # a active, b passive: 16 connections read the active node's Failover object as fast
    # as it answers, for 20 s.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    before = {name: status(node)["counters"] for name, node in cluster.nodes.items()}
    history = ctl(b, "--json", "failover", "history").json()
    flood = subprocess.run(
        [sys.executable, "-c", HAMMER, a.bus_address, "20"], capture_output=True, text=True, timeout=120
    )
    assert flood.returncode == 0, flood.stderr
    after = {name: status(node)["counters"] for name, node in cluster.nodes.items()}
    missed = {
        name: (after[name]["beats_sent"] - before[name]["beats_sent"])
        - (after[name]["beats_answered"] - before[name]["beats_answered"])
        for name in after
    }
    # A beat unanswered within one interval is retried with the next one; what must not
    # happen is a beat held up past the deadline, which the decision would take for silence.
    print(f"{int(flood.stdout)} GetAll calls in 20 s; beats not answered within one interval: {missed}")
    for name in after:
        assert after[name]["silences"] == before[name]["silences"], name
        assert after[name]["beats_received"] > before[name]["beats_received"] + 20 / INTERVAL / 2, name
    assert after["a"]["stalls"] == before["a"]["stalls"]
    assert (role(a), role(b)) == ("active", "passive")
    assert ctl(b, "--json", "failover", "history").json() == history


def mirror_roles(node: Daemon) -> dict[str, str]:
    return {mirror["disk"]: mirror["role"] for mirror in ctl(node, "--json", "mirror", "list").json()}


def test_a_switchover_that_one_copy_cannot_take_puts_everything_back(cluster, sampler):
    # a active, b passive, d1 mirrored to b. A second protected LUN, so that the
    # switchover moves two mirrors at once.
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    ctl(a, "disk", "create", "d2", "16M")
    ctl(a, "mirror", "create", "d2", "sync")
    # Both mirrors in sync on both nodes: b takes over only copies it knows to be current.
    wait(lambda: all(ctl(n, "mirror", "state", d).stdout.strip() == "1" for n in (a, b) for d in ("d1", "d2")))
    ctl(a, "lun", "add", "t1", "d2", "--lun", "4")
    wait(lambda: len(ctl(b, "--json", "lun", "list", "t1").json()) == 2)
    # b's copy of d2 lost its md metadata (its superblock): b can take d1 over, not d2.
    store = b.kernel_file.with_name("datapath.json")
    held = json.loads(store.read_text())
    assert held["d2"]["metadata"]
    held["d2"]["metadata"] = False
    store.write_text(json.dumps(held))
    refused = a.cli("failover", "switchover")
    assert refused.returncode == 8, refused.stderr
    assert "the peer refused: no mirror metadata for d2" in refused.stderr
    # All or nothing: a serves both disks again, b holds both copies, and waits.
    assert (role(a), role(b)) == ("active", "passive")
    assert cluster.holds_vip("a") and not cluster.holds_vip("b")
    assert (served(a)["t1"], served(b)["t1"]) == (True, False)
    assert (mirror_roles(a), mirror_roles(b)) == ({"d1": "source", "d2": "source"}, {"d1": "target", "d2": "target"})
    for disk in ("d1", "d2"):
        wait(lambda disk=disk: ctl(a, "mirror", "state", disk).stdout.strip() == "1")
    (event,) = ctl(a, "--json", "failover", "history").json()[-1:]
    assert event["role"] == "active" and "the switchover failed" in event["reason"]
    seen = sampler.stop()
    assert seen["doubles"] == 0 and seen["holders"] == [cluster.mac("a")]


def test_a_planned_switchover_and_stop(cluster, sampler):
    # a active, b passive; d1 and d2 mirrored to b (b's d2 took its metadata back when it
    # served the copy again).
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    ctl(a, "failover", "switchover")
    assert (role(a), role(b)) == ("passive", "active")
    assert cluster.holds_vip("b") and not cluster.holds_vip("a")
    assert (mirror_roles(a), mirror_roles(b)) == ({"d1": "target", "d2": "target"}, {"d1": "source", "d2": "source"})
    assert (served(a)["t1"], served(b)["t1"]) == (False, True)
    ctl(b, "failover", "stop")
    assert (role(a), role(b)) == ("stopped", "stopped")
    assert cluster.holds_vip("b"), "the active node keeps serving without failover"
    seen = sampler.stop()
    assert seen["doubles"] == 0 and cluster.mac("b") in seen["holders"]
