"""The replication data path between two real kernels: dm-raid raid1 over NBD.

Two guests on the lab's replication bridge: ``source`` assembles the mirror of its disk,
``target`` serves its copy. Disks and state directories live on the host, so a node can
crash (QEMU killed) and boot again with what it had. Proven here, below the daemon (which
does not drive the bridge yet): a disk's existing data reaches the peer; assembling again
adopts what runs; a pulled cable or a crashed peer fails the peer's leg in bounded time
with no error to writers and no task stuck in I/O; the leg comes back by ``resume`` (what the
daemon will call while a mirror is paused) once the peer answers; a source that crashed
during an outage finds its bitmap again; and every resync writes about the dirty regions
only, after which both copies are equal to the byte.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.vm.appliance import VENV_BIN
from tests.vm.harness import Disk, Guest, Nic

pytestmark = pytest.mark.vm

MIB = 1 << 20
VOLUME_SIZE = 64 * MIB
REGION = 64 * 1024
ADDRESSES = {"source": "10.99.0.1", "target": "10.99.0.2"}
MACS = {"source": "52:54:00:99:00:01", "target": "52:54:00:99:00:02"}
STATE_DIR = "/var/lib/applianced"
# nbd-client's I/O timeout (5 s) on one connection, doubled for the emulated guests.
LEG_FAILS_WITHIN = 30.0


class BridgeNode:
    """A guest that runs the bridge's code from the checkout."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        guest.run("modprobe -a dm_mod dm_raid loop && modprobe nbd nbds_max=4")
        self.disk = guest.disk_device("vol")

    def py(self, code: str, timeout: float = 300) -> object:
        """Run ``code`` with the bridge imported; the JSON of what it left in ``result``."""
        preamble = (
            "import json, pathlib, time\n"
            "from applianced.replication.bridge import DeviceMapper, Export, Mirror, PeerEndpoint, Volume\n"
            "from applianced.replication.states import Intent, mirror_state\n"
            f"volume = Volume('vol', {self.disk!r}, {VOLUME_SIZE})\n"
            f"peer = PeerEndpoint({ADDRESSES['target']!r})\n"
            f"mirror = Mirror(volume, pathlib.Path({STATE_DIR!r}), DeviceMapper())\n"
            f"export = Export(volume, pathlib.Path({STATE_DIR!r}), DeviceMapper())\n"
            "result = None\n"
        )
        out = self.guest.run(
            [str(VENV_BIN / "python"), "-c", preamble + code + "\nprint(json.dumps(result))"], cwd="/", timeout=timeout
        )
        return json.loads(out.stdout.splitlines()[-1])

    def checksum(self) -> str:
        # Direct reads: md writes below the page cache of the disk's own device node.
        command = f"dd if={self.disk} bs=1M count={VOLUME_SIZE // MIB} iflag=direct status=none | md5sum"
        return self.guest.run(command, timeout=120).stdout.split()[0]

    def mapped(self) -> list[str]:
        return sorted(self.guest.run("dmsetup table").stdout.splitlines())

    def written_sectors(self) -> int:
        """Sectors written to the disk since boot (field 7 of its block statistics)."""
        name = self.disk.removeprefix("/dev/")
        return int(self.guest.run(f"cat /sys/block/{name}/stat").stdout.split()[6])

    def stuck_tasks(self) -> list[str]:
        """Processes in uninterruptible sleep (D) in two looks a second apart: I/O that hangs."""
        looks = self.guest.run("for i in 1 2; do ps -eo pid=,stat=,comm= | awk '$2 ~ /^D/'; echo; sleep 1; done")
        first, second = (set(look.splitlines()) for look in looks.stdout.split("\n\n")[:2])
        return sorted(first & second)


SERVE = f"export.assemble({ADDRESSES['target']!r})"
ASSEMBLE = "mirror.assemble(peer)"
STATE = "result = [mirror_state(mirror.status(), Intent.MIRROR).name, mirror.device]"
# What the daemon will do while a failure keeps the mirror paused.
RESUME = (
    "deadline = time.monotonic() + 120\nwhile not mirror.resume(peer) and time.monotonic() < deadline: time.sleep(1)"
)
WRITE_REGIONS = """
import mmap, os
fd = os.open({device!r}, os.O_WRONLY | os.O_DIRECT)
buffer = mmap.mmap(-1, {region})
errors = []
for region in {regions!r}:
    buffer.write(os.urandom({region}))
    buffer.seek(0)
    try:
        os.pwrite(fd, buffer, region * {region})
    except OSError as exc:
        errors.append(str(exc))
os.fsync(fd)
result = errors
"""


class Cluster:
    """The two nodes; each keeps its disk and state directory on the host across crashes."""

    def __init__(self, factory, lab, keep: Path) -> None:
        self.factory = factory
        self.lab = lab
        self.keep = keep
        self.boots = 0
        guests = [self._guest(name) for name in ADDRESSES]
        factory.start_all(*guests)
        self.source, self.target = (BridgeNode(guest) for guest in guests)

    def _guest(self, name: str) -> Guest:
        self.boots += 1
        state = self.keep / f"{name}-state"
        state.mkdir(exist_ok=True)
        return self.factory(
            f"{name}-{self.boots}",
            start=False,
            lab=self.lab,
            disks=[Disk("vol", VOLUME_SIZE, path=self.keep / f"{name}.img")],
            # The same MAC after a reboot, so that the peer's ARP entry stays right.
            nics=[Nic("hb", f"{ADDRESSES[name]}/24", mac=MACS[name])],
            rwdirs={STATE_DIR: state},
        )

    def crash_and_boot(self, name: str) -> BridgeNode:
        """Kill the node's QEMU (no sync, as a power cut) and boot it again."""
        getattr(self, name).guest.power_off()
        guest = self._guest(name)
        self.factory.start_all(guest)
        node = BridgeNode(guest)
        setattr(self, name, node)
        return node


@pytest.fixture(scope="module")
def cluster(module_guest_factory, module_lab, tmp_path_factory):
    return Cluster(module_guest_factory, module_lab, tmp_path_factory.mktemp("replication"))


def wait_state(node: BridgeNode, wanted: str, timeout: float) -> float:
    """Seconds until the mirror reports ``wanted``."""
    start = time.monotonic()
    while True:
        state, _ = node.py(STATE)
        if state == wanted:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"mirror still {state} after {timeout} s, not {wanted}"
        time.sleep(1)


def write_during_outage(cluster: Cluster, regions: list[int], cut) -> float:
    """Write ``regions`` while ``cut()`` takes the peer away; seconds until paused."""
    _, device = cluster.source.py(STATE)
    cut()
    start = time.monotonic()
    errors = cluster.source.py(WRITE_REGIONS.format(device=device, region=REGION, regions=regions))
    assert errors == []
    wait_state(cluster.source, "PAUSED", timeout=LEG_FAILS_WITHIN - (time.monotonic() - start))
    paused = time.monotonic() - start
    assert cluster.source.stuck_tasks() == []
    # The bitmap on disk marks every region written while the peer was away (and may
    # still mark regions of an earlier resync that md has not cleared yet).
    assert set(regions) <= set(dirty_regions(cluster.source))
    return paused


def dirty_regions(node: BridgeNode) -> list[int]:
    return node.py("result = mirror.intent_bitmap().dirty_regions()")


def resync_writes(cluster: Cluster, regions: list[int], code: str) -> int:
    """Bytes the peer's disk takes while ``code`` on the source brings the mirror back."""
    written = cluster.target.written_sectors()
    cluster.source.py(code)
    wait_state(cluster.source, "MIRRORING", timeout=120)
    copied = (cluster.target.written_sectors() - written) * 512
    dirty = len(regions) * REGION
    # Shown with -rP: the numbers the README quotes.
    print(f"resync wrote {copied} bytes for {dirty} dirty ({copied / dirty:.2f}x)")
    assert dirty <= copied <= 1.1 * dirty, f"resync wrote {copied} bytes for {dirty} dirty"
    assert cluster.source.checksum() == cluster.target.checksum()
    return copied


def test_existing_data_reaches_the_peer_and_assembling_again_adopts(cluster):
    source, target = cluster.source, cluster.target
    source.guest.run(f"head -c {8 * MIB} /dev/urandom > /tmp/data && dd if=/tmp/data of={source.disk} oflag=direct")
    before = source.checksum()

    target.py(SERVE)
    source.py(ASSEMBLE)
    wait_state(source, "MIRRORING", timeout=180)
    assert source.checksum() == before == target.checksum()
    # Flushes and FUA writes travel to the peer (the NBD device is not write-through).
    assert source.guest.run("cat /sys/block/nbd0/queue/write_cache /sys/block/nbd0/queue/fua").stdout.split() == [
        "write",
        "back",
        "1",
    ]

    mapped = source.mapped(), target.mapped()
    target.py(SERVE)
    source.py(ASSEMBLE)
    assert (source.mapped(), target.mapped()) == mapped
    assert target.guest.run("pgrep -c qemu-nbd").stdout.strip() == "1"
    assert source.guest.run("grep -lv '^0$' /sys/block/nbd*/size | wc -l").stdout.strip() == "1"


def test_pulled_cable_pauses_without_errors_and_resume_copies_dirty_regions(cluster):
    regions = list(range(100, 1000, 45))  # 20 regions spread over the volume
    paused = write_during_outage(cluster, regions, lambda: cluster.target.guest.set_link(up=False))
    print(f"paused {paused:.1f} s after the cable was pulled")
    assert cluster.source.py("result = mirror.resume(peer, probe_timeout=1)") is False

    cluster.target.guest.set_link(up=True)
    resync_writes(cluster, regions, RESUME)


def test_crashed_peer_pauses_without_errors_and_resume_copies_dirty_regions(cluster):
    regions = list(range(3, 1000, 97))
    paused = write_during_outage(cluster, regions, lambda: cluster.target.guest.power_off())
    print(f"paused {paused:.1f} s after the peer crashed")

    cluster.crash_and_boot("target").py(SERVE)
    resync_writes(cluster, regions, RESUME)


def test_a_source_that_crashed_during_an_outage_keeps_its_bitmap(cluster):
    regions = list(range(7, 1000, 61))
    write_during_outage(cluster, regions, lambda: cluster.target.guest.set_link(up=False))
    cluster.crash_and_boot("source")
    assert set(regions) <= set(dirty_regions(cluster.source)), "the bitmap did not survive the crash"
    cluster.target.guest.set_link(up=True)

    resync_writes(cluster, regions, ASSEMBLE)
