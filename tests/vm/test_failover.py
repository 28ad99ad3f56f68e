"""Active/passive failover of two real kernels, with a client writing through the VIP.

Two storage nodes and a client (``tests/vm/pair.py``), node a's d1 mirrored in sync to
node b's c1 (both disks blank: no initial copy). The pair becomes a failover cluster and
the active node is killed while the client writes through the virtual IP, then comes
back and the service goes back to it by hand; then the protected target gets five LUNs,
is switched over, and the other node is killed. No write fails at the client, every
acknowledged block reads back, and the client sees the same disk throughout.

The tests share one cluster and run in order.
"""

from __future__ import annotations

import json
import time

import pytest

from applianced.bus.paths import mirror_path
from applianced.constants import FAILOVER_INTERFACE, FAILOVER_PATH, MIRROR_INTERFACE, TARGETS_PATH
from tests.vm.appliance import FAILOVER_INITIATOR, VENV_BIN
from tests.vm.pair import (
    LAN,
    TARGET,
    VOLUME,
    Node,
    assert_equal_copies,
    paired_cluster,
    serial_of,
    vpd,
)
from tests.vm.sequenced_writes import BLOCK, write_through

pytestmark = pytest.mark.vm


VIP = "10.60.0.100"
PING_NODE = "10.60.0.254"
RESERVATION_KEY = "0x5eed1234"
FAILOVER_PORT = "3261"  # the wildcard portal's (a's 10.60.0.1:3260 stays as it is)
# The client writes the volume's second half during a failover.
FAILOVER_BLOCKS = range(VOLUME // 2 // BLOCK, VOLUME // BLOCK)


@pytest.fixture(scope="module")
def cluster(module_guest_factory, module_lab, tmp_path_factory):
    cluster = paired_cluster(module_guest_factory, module_lab, tmp_path_factory.mktemp("failover"))
    cluster.a.ctl("mirror", "create", "d1", "sync", "--peer-disk", "c1", "--skip-initial-sync")
    cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
    return cluster


def failover_status(node: Node) -> dict:
    return json.loads(node.ctl("--json", "failover", "status").stdout)


def test_kill_the_active_node_mid_write_then_fail_back(cluster, module_lab):
    # a serves d1 (t1) and mirrors it to b's c1, in sync.
    module_lab.add_address("lan", f"{PING_NODE}/24")
    lan = cluster.a.guest.run(f"ip -o addr show to {LAN['a']}/24 | awk '{{print $2}}'").stdout.strip()
    for node in (cluster.a, cluster.b):
        node.ctl("portal", "create", "0.0.0.0", "--port", FAILOVER_PORT)
    cluster.a.ctl_batch(
        ("failover", "add-address", lan, f"{VIP}/24"),
        ("failover", "add-ping-node", PING_NODE, lan),
        ("failover", "protect", "t1"),
        ("failover", "heartbeat", "0.5", "4"),
    )
    assert json.loads(cluster.a.ctl("--json", "failover", "check").stdout) == []
    cluster.a.ctl("failover", "start")
    cluster.b.guest.wait_until(f"{VENV_BIN / 'appliancectl'} target list | grep -q t1", timeout=60)
    serial = serial_of(cluster.a, "d1")
    cluster.client.discover(f"{VIP}:{FAILOVER_PORT}")
    cluster.client.set_node(TARGET, f"{VIP}:{FAILOVER_PORT}", FAILOVER_INITIATOR)
    cluster.client.login(TARGET, f"{VIP}:{FAILOVER_PORT}")
    device = cluster.client_device(serial)
    identity = vpd(cluster, device)
    cluster.b.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "ClientConnections", "u 1")
    # A reservation that the client asks to persist (APTPL), as a cluster file system takes
    # one: a's LIO saves it, a sends it to b, and b's takeover hands it to its LUN.
    cluster.client.reserve_persistently(device, RESERVATION_KEY)
    kept = f"/etc/target/pr/aptpl_{serial}"
    cluster.b.guest.wait_until(f"grep -q sa_res_key={int(RESERVATION_KEY, 16)} {kept}", timeout=60)
    assert cluster.b.guest.run(["stat", "-c", "%a", kept]).stdout.strip() == "600"

    def kill_a() -> None:
        cluster.a.guest.power_off()  # the active node dies mid-write: no RST ever comes
        cluster.b.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "Role", 's "active"', timeout=120)

    written = write_through(cluster.client.guest, device, FAILOVER_BLOCKS, 1, kill_a)
    assert written.errors == 0 and written.acknowledged > 0
    assert vpd(cluster, device) == identity, "the same disk after the takeover"
    cluster.client.assert_reserved(device, RESERVATION_KEY)
    (event,) = json.loads(cluster.b.ctl("--json", "failover", "history").stdout)[-1:]
    print(
        f"failover: node a killed mid-write; the client's longest write took {written.longest:.1f} s, "
        f"{written.acknowledged} writes, 0 failed; b: {event['reason']} ({event['steps']})"
    )
    assert failover_status(cluster.b)["role"] == "active"
    assert failover_status(cluster.b)["counters"]["connections_reset"] == 1
    # a boots again: passive (no failback), its disk the copy again, resynced from b: the
    # regions written since, and those a wrote last, not the whole disk.
    node = cluster.crash_and_boot("a")
    node.wait_property(mirror_path("d1"), MIRROR_INTERFACE, "Role", 's "target"', timeout=240)
    assert failover_status(node)["role"] == "passive"
    cluster.b.ctl("mirror", "wait", "c1", "--timeout", "300")
    copied = node.sectors_written(node.vol) * 512
    print(f"failover: a's resync from b wrote {copied} bytes of a {VOLUME}-byte disk")
    assert copied < VOLUME // 2
    assert_equal_copies(cluster, cluster.b, node)

    # Failback by hand, with the client writing: a planned switchover loses nothing.
    node.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "ClientConnections", "u 1")
    written = write_through(
        cluster.client.guest, device, FAILOVER_BLOCKS, 2, lambda: cluster.b.ctl("failover", "switchover")
    )
    assert written.errors == 0 and written.acknowledged > 0
    assert (failover_status(node)["role"], failover_status(cluster.b)["role"]) == ("active", "passive")
    assert vpd(cluster, device) == identity
    cluster.client.assert_reserved(device, RESERVATION_KEY)  # b's LIO saved it, b sent it back
    cluster.client.clear_reservations(device, RESERVATION_KEY)
    (event,) = json.loads(node.ctl("--json", "failover", "history").stdout)[-1:]
    print(
        f"failover: failback by hand; the client's longest write took {written.longest:.1f} s, "
        f"{written.acknowledged} writes, 0 failed; a: {event['reason']} ({event['steps']})"
    )
    node.ctl("mirror", "wait", "d1", "--timeout", "300")
    assert_equal_copies(cluster, node, cluster.b)


# With d1, five protected LUNs, each its own mirror: a role change moves them in one pass.
MORE_DISKS = [f"x{number}" for number in range(1, 5)]
LUNS = 1 + len(MORE_DISKS)


def luns_served(node: Node) -> int:
    """The LUNs of t1 in the node's LIO (configfs), whatever applianced thinks."""
    found = node.guest.run(f"ls /sys/kernel/config/target/iscsi/{TARGET}/tpgt_1/lun", check=False)
    return len(found.stdout.split()) if found.rc == 0 else 0


def luns_waiting(node: Node) -> dict[str, int | None]:
    """``backstores_of_luns`` of a passive node, whose TPG of t1 must be disabled: the LUNs
    made in advance over the copies' prepared arrays. Read until three looks a few seconds
    apart agree and every LUN has its backstore, so that a copy's array forked anew (its LUN
    made again: a directory first, its link an instant later) has settled."""
    looks: list[dict[str, int | None]] = []
    deadline = time.monotonic() + 180
    while len(looks) < 3 or not looks[-1] == looks[-2] == looks[-3] or None in looks[-1].values():
        assert time.monotonic() < deadline, f"{node.guest.name}'s LUNs of t1 did not settle: {looks[-3:]}"
        enabled = node.guest.run(f"cat /sys/kernel/config/target/iscsi/{TARGET}/tpgt_1/enable").stdout.strip()
        assert enabled == "0", f"{node.guest.name}'s TPG of t1 is enabled"
        looks.append(backstores_of_luns(node))
        time.sleep(3)
    return looks[-1]


def backstores_of_luns(node: Node) -> dict[str, int | None]:
    """Each LUN of t1 in the node's LIO with its backstore's configfs inode (a backstore
    made again, even under the same name, has a new one), or None for a LUN caught between
    its directory and its link to the backstore."""
    script = (
        f"for lun in /sys/kernel/config/target/iscsi/{TARGET}/tpgt_1/lun/lun_*; do "
        "link=$(find $lun -maxdepth 1 -type l); "
        'echo "$(basename $lun) $([ -n "$link" ] && stat -L -c %i $link || echo -)"; done'
    )
    found = node.guest.run(script)
    looks = (line.split() for line in found.stdout.split("\n") if " " in line)
    return {lun: None if inode == "-" else int(inode) for lun, inode in looks}


def luns_configured(node: Node) -> int:
    """The LUNs of t1 in the node's configuration (a passive node serves none of them)."""
    prefix = f"{TARGETS_PATH}/t1/luns/"
    return sum(path.startswith(prefix) for path in node.objects())


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout:.0f} s: {what}"
        time.sleep(3)


def serves_everything(node: Node, written, what: str) -> None:
    """``node`` is active with the source of every mirror and serves every LUN; the client
    lost nothing. What the role change took is printed."""
    assert written.errors == 0 and written.acknowledged > 0
    assert failover_status(node)["role"] == "active"
    assert {mirror["role"] for mirror in node.ctl_json("mirror", "list")} == {"source"}
    assert luns_served(node) == LUNS
    (event,) = node.ctl_json("failover", "history")[-1:]
    print(
        f"failover: {what}; the client's longest write took {written.longest:.1f} s, "
        f"{written.acknowledged} writes, 0 failed; {node.guest.name}: {event['reason']} ({event['steps']})"
    )


def test_five_luns_switch_over_and_take_over_in_one_pass(cluster):
    # a active (d1, since the failback), b passive, in sync; the client writes through the VIP.
    a, b = cluster.a, cluster.b
    a.ctl_batch(*(("disk", "create", name, "8M") for name in MORE_DISKS))
    a.ctl_batch(*(("mirror", "create", name, "sync") for name in MORE_DISKS))
    wait_for(lambda: a.mirrors_in_state(1) == LUNS, "every mirror in sync")
    a.ctl_batch(*(("lun", "add", "t1", name) for name in MORE_DISKS))
    wait_for(lambda: luns_configured(b) == LUNS, "b keeps t1 ready with every LUN")
    # ... and its LUNs made in advance, over the copies' prepared arrays, its TPG disabled.
    wait_for(lambda: luns_served(b) == LUNS, "b makes t1's LUNs in advance")
    waiting = luns_waiting(b)
    assert (luns_served(a), len(waiting), failover_status(b)["role"]) == (LUNS, LUNS, "passive")
    device = cluster.client_device(serial_of(a, "d1"))

    written = write_through(cluster.client.guest, device, FAILOVER_BLOCKS, 3, lambda: a.ctl("failover", "switchover"))
    assert failover_status(a)["role"] == "passive"
    serves_everything(b, written, f"switchover of {LUNS} LUNs")
    assert backstores_of_luns(b) == waiting, "the switchover made b's backstores again instead of enabling them"
    wait_for(lambda: b.mirrors_in_state(1) == LUNS, "every mirror in sync again")
    wait_for(lambda: luns_served(a) == LUNS, "a, passive now, makes t1's LUNs in advance")
    waiting = luns_waiting(a)

    def kill_b() -> None:
        b.guest.power_off()
        a.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "Role", 's "active"', timeout=180)

    written = write_through(cluster.client.guest, device, FAILOVER_BLOCKS, 4, kill_b)
    serves_everything(a, written, f"b killed with {LUNS} LUNs")
    assert backstores_of_luns(a) == waiting, "the takeover made a's backstores again instead of enabling them"

    # b boots again: its disks become the copies again (the LUNs of its disabled TPG let go
    # of the arrays that stop), a resyncs them, and b waits with every LUN made in advance.
    b = cluster.crash_and_boot("b")
    wait_for(lambda: {m["role"] for m in b.ctl_json("mirror", "list")} == {"target"}, "b's disks are the copies again")
    wait_for(lambda: a.mirrors_in_state(1) == LUNS, "every mirror in sync after b's return")
    wait_for(lambda: luns_served(b) == LUNS, "b makes t1's LUNs in advance again")
    assert len(luns_waiting(b)) == LUNS and failover_status(b)["role"] == "passive"
