"""The replication data path between two real kernels: dm-raid raid1 over NBD.

Two guests on a private bridge: ``source`` assembles the mirror of its disk, ``target``
serves its copy. Proven here, below the daemon (which does not drive the bridge yet):
a disk's existing data reaches the peer; assembling again adopts what runs; a pulled
cable fails the peer's leg in bounded time with no error to writers; after the cable
is back, a reassembly copies only the regions written meanwhile, and both copies are
equal to the byte.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.vm.appliance import VENV_BIN
from tests.vm.harness import Disk, Guest, Nic

pytestmark = pytest.mark.vm

MIB = 1 << 20
VOLUME_SIZE = 64 * MIB
REGION = 64 * 1024
SOURCE_ADDRESS, TARGET_ADDRESS = "10.99.0.1", "10.99.0.2"
STATE_DIR = "/var/lib/applianced"
# nbd-client's I/O timeout (5 s) on one connection, doubled for the emulated guests.
LEG_FAILS_WITHIN = 30.0


class BridgeNode:
    """A guest that runs the bridge's code from the checkout."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        guest.run("modprobe -a dm_mod dm_raid loop && modprobe nbd nbds_max=4")
        guest.run(f"mkdir -p {STATE_DIR} && (mountpoint -q {STATE_DIR} || mount -t tmpfs tmpfs {STATE_DIR})")
        self.disk = guest.disk_device("vol")

    def py(self, code: str, timeout: float = 300) -> object:
        """Run ``code`` with the bridge imported; the JSON it prints as ``result``."""
        preamble = (
            "import json, pathlib\n"
            "from applianced.replication.bridge import DeviceMapper, Export, Mirror, PeerEndpoint, Volume\n"
            "from applianced.replication.states import Intent, mirror_state\n"
            f"volume = Volume('vol', {self.disk!r}, {VOLUME_SIZE})\n"
            f"state_dir = pathlib.Path({STATE_DIR!r})\n"
            "result = None\n"
        )
        out = self.guest.run(
            [str(VENV_BIN / "python"), "-c", preamble + code + "\nprint(json.dumps(result))"], cwd="/", timeout=timeout
        )
        return json.loads(out.stdout.splitlines()[-1])

    def checksum(self, device: str | None = None) -> str:
        device = device or self.disk
        # Direct reads: md writes below the page cache of the disk's own device node.
        command = f"dd if={device} bs=1M count={VOLUME_SIZE // MIB} iflag=direct status=none | md5sum"
        return self.guest.run(command, timeout=120).stdout.split()[0]

    def mapped(self) -> list[str]:
        return sorted(self.guest.run("dmsetup table").stdout.splitlines())

    def written_sectors(self) -> int:
        """Sectors written to the disk since boot (field 7 of its block statistics)."""
        name = self.disk.removeprefix("/dev/")
        return int(self.guest.run(f"cat /sys/block/{name}/stat").stdout.split()[6])


SERVE = "Export(volume, state_dir, DeviceMapper()).assemble({address!r})"
ASSEMBLE = "Mirror(volume, state_dir, DeviceMapper()).assemble(PeerEndpoint({address!r}))"
STATE = (
    "m = Mirror(volume, state_dir, DeviceMapper())\nresult = [mirror_state(m.status(), Intent.MIRROR).name, m.device]"
)


@pytest.fixture(scope="module")
def pair(module_guest_factory, module_lab):
    """Source and target on the lab's heartbeat/replication bridge, each with a 64 MiB disk."""
    guests = [
        module_guest_factory(
            name, start=False, lab=module_lab, disks=[Disk("vol", VOLUME_SIZE)], nics=[Nic("hb", f"{address}/24")]
        )
        for name, address in (("source", SOURCE_ADDRESS), ("target", TARGET_ADDRESS))
    ]
    module_guest_factory.start_all(*guests)
    return BridgeNode(guests[0]), BridgeNode(guests[1])


def wait_state(node: BridgeNode, wanted: str, timeout: float) -> float:
    """Seconds until the mirror reports ``wanted``."""
    start = time.monotonic()
    while True:
        state, _ = node.py(STATE)
        if state == wanted:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"mirror still {state} after {timeout} s, not {wanted}"
        time.sleep(1)


def test_existing_data_reaches_the_peer_and_assembling_again_adopts(pair):
    source, target = pair
    source.guest.run(f"head -c {8 * MIB} /dev/urandom > /tmp/data && dd if=/tmp/data of={source.disk} oflag=direct")
    before = source.checksum()

    target.py(SERVE.format(address=TARGET_ADDRESS))
    source.py(ASSEMBLE.format(address=TARGET_ADDRESS))
    wait_state(source, "MIRRORING", timeout=180)
    assert source.checksum() == before == target.checksum()

    mapped = source.mapped(), target.mapped()
    target.py(SERVE.format(address=TARGET_ADDRESS))
    source.py(ASSEMBLE.format(address=TARGET_ADDRESS))
    assert (source.mapped(), target.mapped()) == mapped
    assert target.guest.run("pgrep -c qemu-nbd").stdout.strip() == "1"
    assert source.guest.run("grep -lv '^0$' /sys/block/nbd*/size | wc -l").stdout.strip() == "1"


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


def test_pulled_cable_fails_the_leg_without_errors_and_resync_copies_dirty_regions(pair):
    source, target = pair
    _, device = source.py(STATE)
    regions = list(range(100, 1000, 45))  # 20 regions spread over the volume

    target.guest.set_link(up=False)
    cut = time.monotonic()
    errors = source.py(WRITE_REGIONS.format(device=device, region=REGION, regions=regions))
    assert errors == []
    wait_state(source, "PAUSED", timeout=LEG_FAILS_WITHIN - (time.monotonic() - cut))
    paused_after = time.monotonic() - cut

    target.guest.set_link(up=True)
    peer_written = target.written_sectors()
    source.py(ASSEMBLE.format(address=TARGET_ADDRESS))
    wait_state(source, "MIRRORING", timeout=120)
    copied = (target.written_sectors() - peer_written) * 512
    dirty = len(regions) * REGION
    # Shown with -rP: the numbers the README quotes.
    print(f"paused {paused_after:.1f} s after the cut; resync wrote {copied} bytes for {dirty} dirty")
    assert dirty <= copied <= 1.1 * dirty, f"resync wrote {copied} bytes for {dirty} dirty"
    assert source.checksum() == target.checksum()
