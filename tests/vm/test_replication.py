"""Replicated volumes between two real kernels, driven through appliancectl, with a client.

Two storage nodes and a client (``tests/vm/pair.py``): the client (open-iscsi) writes
through iSCSI while the mirror is made, cut, resumed, broken, split and switched over.
Every test ends with both copies equal to the byte; no write fails at the client and no
task hangs.

The tests share one cluster and run in order: each starts from the state the one before
left (a mirror in sync unless it says otherwise). The failover cluster is
tests/vm/test_failover.py's.
"""

from __future__ import annotations

import datetime
import json

import pytest

from applianced.bus.paths import mirror_path
from applianced.constants import MIRROR_INTERFACE
from tests.vm.appliance import VENV_BIN
from tests.vm.harness import REPO_ROOT
from tests.vm.pair import (
    INITIATOR,
    LAN,
    MIB,
    REGION,
    TARGET,
    VOLUME,
    Cluster,
    Node,
    assert_equal_copies,
    paired_cluster,
    serial_of,
    vpd,
)

pytestmark = pytest.mark.vm

# The documented bound: the NBD timeout (5 s) plus the monitor's look, with room for
# emulated guests under load; each look from the host costs a CLI start (seconds).
PAUSED_WITHIN = 40.0


@pytest.fixture(scope="module")
def cluster(module_guest_factory, module_lab, tmp_path_factory):
    cluster = paired_cluster(module_guest_factory, module_lab, tmp_path_factory.mktemp("replication"))
    cluster.client.discover(LAN["a"])
    cluster.client.login(TARGET, LAN["a"])
    return cluster


def test_a_disk_in_use_is_mirrored_with_its_data_and_identity(cluster):
    serial = serial_of(cluster.a, "d1")
    device = cluster.client_device(serial)
    cluster.client.guest.run(
        f"head -c {8 * MIB} /dev/urandom > /tmp/data && dd if=/tmp/data of={device} bs=1M oflag=direct"
    )
    identity = vpd(cluster, device)
    # Writes go on while the mirror is made: a pause at most, never an error.
    cluster.client.guest.spawn(
        "writer",
        f"for i in $(seq 40); do dd if=/dev/urandom of={device} bs=64K seek=$((200 + i)) count=1 oflag=direct "
        "status=none || echo failed; sleep 0.2; done; echo done",
    )
    cluster.a.ctl("mirror", "create", "d1", "sync", "--peer-disk", "c1")
    cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
    assert cluster.client.guest.wait_exit("writer", timeout=120) == 0
    assert "failed" not in cluster.client.guest.spawn_log("writer")
    assert_equal_copies(cluster, cluster.a, cluster.b)
    assert vpd(cluster, device) == identity, "the initiator sees the same disk"
    # The copy took the source's serial, and is locked: not served, not mountable.
    copy = next(d for d in cluster.b.ctl_json("disk", "list") if d["name"] == "c1")
    assert (copy["serial"], copy["status"]) == (serial, "locked")
    assert cluster.b.guest.run(f"mount -o ro {cluster.b.vol} /mnt", check=False).rc != 0
    backstores = cluster.b.guest.run("ls /sys/kernel/config/target/core/iblock_*/ 2>/dev/null || true").stdout
    assert "c1" not in backstores.split()
    assert cluster.a.mirror()["state_name"] == "mirroring"


def test_sync_mode_fio_verified_writes_are_on_both_nodes(cluster):
    device = cluster.client_device(serial_of(cluster.a, "d1"))
    fio = (
        f"fio --name=verify --filename={device} --rw=randwrite --bs=4k --size=8M --offset=16M --direct=1 "
        "--ioengine=libaio --iodepth=4 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=json"
    )
    result = json.loads(cluster.client.guest.run(fio, timeout=900).stdout)
    assert result["jobs"][0]["error"] == 0
    assert cluster.a.state() == 1
    assert_equal_copies(cluster, cluster.a, cluster.b)


def outage(cluster: Cluster, regions: list[int], cut, name: str) -> float:
    """Write ``regions`` at the client while ``cut()`` takes the copy away; seconds from
    the cut to the source's daemon logging the mirror paused (its own clock both times)."""
    device = cluster.client_device(serial_of(cluster.a, "d1"))
    cut_at = float(cluster.a.guest.run("date +%s.%N").stdout)
    cut()
    assert cluster.client_write(device, regions) == []
    cluster.a.wait_state(4, timeout=PAUSED_WITHIN)
    paused = paused_at(cluster.a, after=cut_at) - cut_at
    print(f"{name}: paused {paused:.1f} s after the failure, {len(regions)} writes, none failed")
    assert paused < PAUSED_WITHIN
    assert cluster.a.stuck_tasks() == [] and cluster.client.stuck_tasks() == []
    return paused


def paused_at(node: Node, after: float) -> float:
    """When the daemon logged the mirror of d1 paused, the first time after ``after``."""
    for line in node.log().splitlines():
        if "mirror d1: source, paused" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=datetime.UTC)
            if stamp.timestamp() > after:
                return stamp.timestamp()
    raise AssertionError("the daemon never logged the mirror paused")


def resync_writes(cluster: Cluster, regions: list[int], name: str, rebooted: bool = False) -> None:
    """After the cause is gone: the mirror comes back by itself, copying about the dirty
    regions. A peer that was ``rebooted`` counts from its boot: nothing but the resync
    writes to its disk, which may have begun already."""
    before = 0 if rebooted else cluster.b.sectors_written(cluster.b.vol)
    cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
    copied = (cluster.b.sectors_written(cluster.b.vol) - before) * 512
    dirty = len(regions) * REGION
    print(f"{name}: resync wrote {copied} bytes for {dirty} dirty ({copied / dirty:.2f}x)")
    assert dirty <= copied <= 1.1 * dirty, f"resync wrote {copied} bytes for {dirty} dirty"
    assert_equal_copies(cluster, cluster.a, cluster.b)


def test_cut_link_pauses_and_the_resync_copies_only_what_was_written(cluster):
    regions = list(range(300, 1000, 35))
    outage(cluster, regions, lambda: cluster.b.guest.set_link(up=False, slot=1), "cable pulled")
    counters = cluster.a.mirror()["counters"]
    cluster.b.guest.set_link(up=True, slot=1)
    resync_writes(cluster, regions, "cable pulled")
    assert cluster.a.mirror()["counters"]["Reconnects"] == counters["Reconnects"] + 1


def test_a_source_rebooted_during_the_outage_keeps_its_bitmap(cluster):
    regions = list(range(5, 900, 61))
    outage(cluster, regions, lambda: cluster.b.guest.set_link(up=False, slot=1), "source crash")
    cluster.client.logout(TARGET, LAN["a"])
    cluster.crash_and_boot("a")
    cluster.b.guest.set_link(up=True, slot=1)
    resync_writes(cluster, regions, "source crashed and booted again")
    cluster.client.login(TARGET, LAN["a"])


def test_a_killed_peer_pauses_and_its_return_resyncs_partially(cluster):
    regions = list(range(11, 1000, 97))
    outage(cluster, regions, lambda: cluster.b.guest.power_off(), "peer killed")
    cluster.crash_and_boot("b")
    resync_writes(cluster, regions, "peer killed and booted again", rebooted=True)


def test_break_and_resync_copy_the_whole_disk(cluster):
    for action in ("break", "resync"):
        before = cluster.b.sectors_written(cluster.b.vol)
        cluster.a.ctl("mirror", action, "d1")
        if action == "break":
            assert cluster.a.state() == 3
            cluster.a.ctl("mirror", "continue", "d1")
        cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
        copied = (cluster.b.sectors_written(cluster.b.vol) - before) * 512
        print(f"{action}: resync wrote {copied} bytes of a {VOLUME}-byte disk")
        assert copied >= VOLUME
    assert_equal_copies(cluster, cluster.a, cluster.b)


def test_a_file_disk_copies_its_data_only_and_a_blank_one_nothing(cluster):
    # On the guest's tmpfs: the 9p share of the state directory has no SEEK_HOLE.
    path, copy = "/tmp/d2.img", "/var/lib/applianced/disks/d2.img"
    cluster.a.ctl_batch(("disk", "create", "d2", "32M", "--path", path), ("disk", "create", "d3", "16M"))
    cluster.a.guest.run(f"dd if=/dev/urandom of={path} bs=64K count=8 seek=100 conv=notrunc status=none")
    cluster.a.ctl("mirror", "create", "d2", "sync")
    cluster.a.ctl("mirror", "create", "d3", "sync", "--skip-initial-sync")
    cluster.a.ctl("mirror", "wait", "d2", "--timeout", "300")
    # The copies are files the peer made; their loop devices count what they took.
    for disk, wanted in (("d2", 8 * REGION), ("d3", 0)):
        loop = cluster.b.guest.run(f"losetup -j /var/lib/applianced/disks/{disk}.img -n -O NAME").stdout.split()[0]
        written = cluster.b.sectors_written(loop) * 512
        print(f"initial sync of {disk}: {written} bytes written on the copy for {wanted} of data")
        assert wanted <= written <= wanted + 2 * REGION
    assert cluster.a.checksum(path, 32 * MIB) == cluster.b.checksum(copy, 32 * MIB)
    # Grown on both nodes, written at its new end, and equal again.
    cluster.a.ctl("mirror", "grow", "d2", "48M")
    cluster.a.ctl("mirror", "wait", "d2", "--timeout", "300")
    top = "/run/applianced/block/applianced-disk-d2"
    assert int(cluster.a.guest.run(["blockdev", "--getsize64", top]).stdout) == 48 * MIB
    cluster.a.guest.run(f"dd if=/dev/urandom of={top} bs=64K count=4 seek=700 oflag=direct status=none")
    cluster.a.wait_property(mirror_path("d2"), MIRROR_INTERFACE, "State", "u 1")
    assert cluster.a.checksum(path, 48 * MIB) == cluster.b.checksum(copy, 48 * MIB)
    for disk in ("d2", "d3"):
        cluster.a.ctl("mirror", "delete", disk)
    # Both halves are plain disks again, with their data; the former copy has a serial of its own.
    assert serial_of(cluster.a, "d2") != serial_of(cluster.b, "d2")
    assert cluster.a.checksum(path, 48 * MIB) == cluster.b.checksum(copy, 48 * MIB)


def test_split_brain_is_refused_then_recovered_partially(cluster):
    cluster.b.guest.set_link(up=False, slot=1)
    cluster.b.guest.set_link(up=False, slot=0)  # the peer link's auxiliary path too: the nodes are apart
    cluster.a.wait_state(4, timeout=PAUSED_WITHIN)
    cluster.b.ctl("mirror", "switchover", "c1", "--force")  # the copy takes over alone
    written_on_b = [2, 3, 500]
    written_on_a = [600, 700]
    cluster.b.guest.run(
        "; ".join(
            f"dd if=/dev/urandom of=/run/applianced/block/applianced-disk-c1 bs=64K seek={r} count=1 oflag=direct"
            for r in written_on_b
        )
    )
    assert cluster.client_write(cluster.client_device(serial_of(cluster.a, "d1")), written_on_a) == []
    cluster.b.guest.set_link(up=True, slot=0)
    cluster.b.guest.set_link(up=True, slot=1)
    cluster.a.wait_property(mirror_path("d1"), MIRROR_INTERFACE, "SplitBrain", "b true", timeout=120)
    assert cluster.a.state() == 4, "never resolved silently"
    before = cluster.b.sectors_written(cluster.b.vol)
    cluster.b.ctl("mirror", "prepare-target", "c1")  # b's changes are the ones to overwrite
    cluster.a.ctl("mirror", "continue", "d1")
    cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
    copied = (cluster.b.sectors_written(cluster.b.vol) - before) * 512
    dirty = len(set(written_on_a) | set(written_on_b)) * REGION
    print(f"split brain recovery: resync wrote {copied} bytes for {dirty} changed on either side")
    assert dirty <= copied <= dirty + 4 * REGION
    assert_equal_copies(cluster, cluster.a, cluster.b)


@pytest.mark.xfail(
    strict=True,
    reason="md's write-behind does not take effect on Debian 12's kernel (6.1): measured, a raid1 "
    "with --write-behind=256 and a write-mostly leg 200 ms away completes 4 KiB writes in 208 ms "
    "with bitmap/max_backlog_used 0, so async mode waits for the peer like sync mode",
)
def test_an_async_queue_over_its_high_water_mark_pauses_then_resyncs(cluster):
    cluster.a.ctl("mirror", "mode", "d1", "async")
    cluster.a.ctl("mirror", "tune", "d1", "--high-water", "16", "--low-water", "4")
    # A slow link: the queue grows behind the writes.
    cluster.b.guest.run("tc qdisc add dev $(ip -o addr show to 10.61.0.2/24 | awk '{print $2}') root netem delay 200ms")
    device = cluster.client_device(serial_of(cluster.a, "d1"))
    burst = (
        f"fio --name=burst --filename={device} --rw=randwrite --bs=4k --size=8M --direct=1 --ioengine=libaio "
        "--iodepth=32 --runtime=5 --time_based"
    )
    cluster.client.guest.run(burst, timeout=300)
    shown = cluster.a.mirror()
    print(f"async queue: {shown['reason'] or shown['state_name']}, counters {shown['counters']}")
    cluster.b.guest.run("tc qdisc del dev $(ip -o addr show to 10.61.0.2/24 | awk '{print $2}') root")
    cluster.a.ctl("mirror", "wait", "d1", "--timeout", "300")
    cluster.a.ctl("mirror", "mode", "d1", "sync")  # the tests after this one run in sync mode
    assert_equal_copies(cluster, cluster.a, cluster.b)
    assert "the async queue crossed its high-water mark" in cluster.a.log()


def array_over_own_leg(node: Node, disk: str) -> str:
    """The md array over the node's own leg of ``disk`` ("" if none runs)."""
    leg = node.guest.run(f"dmsetup info -c -o blkdevname --noheadings applianced-leg-{disk}").stdout.strip()
    return node.guest.run(f"ls /sys/block/{leg}/holders").stdout.strip()


def test_switchover_both_ways_with_the_client_following(cluster):
    serial = serial_of(cluster.a, "d1")
    device = cluster.client_device(serial)
    cluster.client.guest.run(
        f"dd if=/dev/urandom of=/tmp/before bs=1M count=2 && dd if=/tmp/before of={device} bs=1M oflag=direct"
    )
    identity = vpd(cluster, device)
    cluster.client.logout(TARGET, LAN["a"])
    # The copy's array runs before any switchover, degraded (the peer's leg is the source's
    # own), and it is what serves afterwards: the switchover starts no array.
    prepared = array_over_own_leg(cluster.b, "c1")
    assert prepared.startswith("md")
    assert cluster.b.guest.run(f"cat /sys/block/{prepared}/md/degraded").stdout.strip() == "1"
    cluster.a.ctl("mirror", "switchover", "d1")
    cluster.b.wait_state(1, disk="c1", timeout=120)
    assert cluster.a.mirror()["role"] == "target"
    assert array_over_own_leg(cluster.b, "c1") == prepared
    # The new source exports its disk, with the same identity, under the same target name.
    cluster.b.ctl_batch(
        ("target", "create", "t1"),
        ("portal", "create", LAN["b"]),
        ("lun", "add", "t1", "c1"),
        ("acl", "add", "t1", INITIATOR),
    )
    cluster.client.discover(LAN["b"])
    cluster.client.login(TARGET, LAN["b"])
    device = cluster.client_device(serial)
    check = f"dd if={device} bs=1M count=2 iflag=direct status=none | cmp - /tmp/before"
    assert cluster.client.guest.run(check, check=False).rc == 0, "no data lost"
    assert vpd(cluster, device) == identity
    cluster.client.guest.run(
        f"dd if=/dev/urandom of=/tmp/after bs=1M count=1 && dd if=/tmp/after of={device} bs=1M seek=4 oflag=direct"
    )
    cluster.client.logout(TARGET, LAN["b"])
    cluster.b.ctl("target", "delete", "t1")
    cluster.b.ctl("mirror", "switchover", "c1")
    cluster.a.wait_state(1, timeout=120)
    cluster.client.login(TARGET, LAN["a"])
    device = cluster.client_device(serial)
    check = f"dd if={device} bs=1M count=1 skip=4 iflag=direct status=none | cmp - /tmp/after"
    assert cluster.client.guest.run(check, check=False).rc == 0
    assert_equal_copies(cluster, cluster.a, cluster.b)


def test_a_daemon_restart_adopts_the_running_mirror(cluster):
    # The stacks of both nodes, and the copy's NBD server (which outlives its daemon). The
    # bitmap line of mdstat counts the bitmap's pages in memory, which md frees as the
    # regions of the last writes clear: it is not part of the stack.
    devices = "dmsetup table; grep -v '^ *bitmap:' /proc/mdstat; losetup -a; pgrep -a qemu-nbd || true"
    # The switchover before leaves the exports it fenced suspended, their servers running,
    # for FENCED_SERVERS_LINGER: the stacks are compared once those servers are gone.
    for node in (cluster.a, cluster.b):
        node.guest.wait_until(FENCED_SERVERS_GONE, timeout=120)
    before = cluster.a.guest.run(devices).stdout, cluster.b.guest.run(devices).stdout
    for node in (cluster.a, cluster.b):
        node.stop()
        node.start()
    assert (cluster.a.guest.run(devices).stdout, cluster.b.guest.run(devices).stdout) == before
    starts = [line for line in cluster.a.log().splitlines() if "kernel reconciled at start-up" in line]
    assert starts[-1].endswith("with 0 change(s)")
    assert cluster.a.state() == 1
    assert "qemu-nbd" in before[1]


# No export is fenced and still served: none suspended, and none with the error table
# that a fence ends in has a qemu-nbd left.
FENCED_SERVERS_GONE = (
    "dmsetup info -c --noheadings -o name,suspended | grep -q '^applianced-export-.*:Suspended' && exit 1; "
    "for d in $(dmsetup table | awk -F': ' '/^applianced-export-.* error/ {print $1}'); do "
    'pgrep -f -- "--export-name=${d#applianced-export-}( |$)" >/dev/null && exit 1; done; exit 0'
)

# In the client's guest (no daemon there): a copy served by the bridge's own code on
# loopback, written through the kernel's NBD client as its source would, then fenced as a
# takeover fences it. Prints what it saw, as JSON.
FENCE = r"""
import json, mmap, os, sys, threading
from pathlib import Path
from applianced.blockdev import nbd
from applianced.replication import bridge

state, port, way = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
(state / "replication").mkdir(parents=True, exist_ok=True)
path = state / "copy.img"
path.write_bytes(bytes(8 << 20))
volume = bridge.Volume("fence-test", str(path), True, 8 << 20)
data_path = bridge.DataPath(state)
data_path.prepare()
export = data_path.export(volume)
export.assemble("127.0.0.1", port, fresh=True)
device = nbd.connect("127.0.0.1", port, volume.name, 5)
data = bridge.META_SECTORS * 512  # the copy's first byte, behind the metadata

def write(device, offset, byte):
    block = mmap.mmap(-1, 4096)
    block.write(byte * 4096)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwritev(fd, [block], offset)
        return "written"
    except OSError as exc:
        return exc.strerror
    finally:
        os.close(fd)

def copy(offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(1).hex()

seen = {"before": write(device, data, b"A")}
export.fence()
seen["fenced"] = export.fenced()
late = {}
writer = threading.Thread(target=lambda: late.update(late=write(device, data + 4096, b"B")))
writer.start()
writer.join(2)
seen["held"] = writer.is_alive()
seen["copy while held"] = copy(4096)
if way == "stop":
    export.stop_serving()
else:  # served again, as after a takeover that failed
    export.assemble("127.0.0.1", port)
writer.join(60)
seen["late"] = late.get("late")
seen["server"] = export.server_pid() is not None
seen["suspended"] = export.dm.info(export.name).suspended
nbd.disconnect(device)
if way == "serve-again":
    again = nbd.connect("127.0.0.1", port, volume.name, 5)
    seen["after"] = write(again, data + 8192, b"C")
    nbd.disconnect(again)
seen["copy"] = [copy(0), copy(4096), copy(8192)]
export.disassemble()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("way", ["stop", "serve-again"])
def test_a_fenced_export_holds_the_old_sources_writes_and_never_applies_them(cluster, way):
    """A takeover fences each copy's export (suspended, no uevent in the stall): a write the
    old source sends after it waits, never reaches the copy, and fails once the server is
    stopped (the takeover's clean-up) or the copy is served again (a takeover undone)."""
    port = 20100 if way == "stop" else 20101
    script = [str(VENV_BIN / "python"), "-c", FENCE, f"/run/fence-{way}", str(port), way]
    seen = json.loads(cluster.client.guest.run(script, timeout=180, env={"PYTHONPATH": str(REPO_ROOT)}).stdout)
    assert seen["before"] == "written"
    assert seen["fenced"] is True
    assert seen["held"] is True
    assert seen["copy while held"] == "00"
    assert seen["late"] not in (None, "written")
    assert seen["suspended"] is False  # a suspended device would hang whoever reads it
    if way == "stop":
        assert seen["server"] is False
        assert seen["copy"] == ["41", "00", "00"]
    else:
        assert seen["server"] is True
        assert seen["after"] == "written"
        assert seen["copy"] == ["41", "00", "43"]
