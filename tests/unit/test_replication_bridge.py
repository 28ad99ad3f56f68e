"""The bridge's logic without a kernel: status lines, states, region sizes, the tables it
asks device-mapper for. That the tables work is proven in tests/vm/test_replication_bridge.py."""

import socket
from pathlib import Path

import pytest

from applianced.errors import InvalidArgument, KernelError
from applianced.replication import bridge
from applianced.replication.bridge import RAID_MAGIC, DeviceMapper, Mirror, PeerEndpoint, Volume, region_size
from applianced.replication.states import Intent, MirrorState, RaidStatus, mirror_state

GIB = 1 << 30


def test_status_line_of_a_mirror_in_sync():
    status = RaidStatus.parse("0 131072 raid raid1 2 AA 131072/131072 idle 0 0 -")
    assert status == RaidStatus("AA", 131072, 131072, "idle", 0)
    assert status.local_alive and not status.peer_dead and not status.copying


@pytest.mark.parametrize(
    "line",
    [
        "0 131072 linear 7:0 0",
        "0 131072 raid raid1 2 A 1/2 idle 0 0 -",
        "0 131072 raid raid1 2 AX 1/2 idle 0 0 -",
        "0 131072 raid raid1 2 AA 1-2 idle 0 0 -",
        "0 131072 raid raid1",
        "",
    ],
)
def test_unexpected_status_lines_are_named_kernel_errors(line):
    with pytest.raises(KernelError, match="unexpected raid status"):
        RaidStatus.parse(line)


@pytest.mark.parametrize(
    ("line", "intent", "state"),
    [
        ("0 8 raid raid1 2 AA 8/8 idle 0 0 -", Intent.MIRROR, MirrorState.MIRRORING),
        ("0 8 raid raid1 2 Aa 4/8 recover 0 0 -", Intent.MIRROR, MirrorState.RESYNCING),
        ("0 8 raid raid1 2 Aa 0/8 frozen 0 0 -", Intent.MIRROR, MirrorState.RESYNC_PENDING),
        ("0 8 raid raid1 2 AD 8/8 idle 0 0 -", Intent.MIRROR, MirrorState.PAUSED),
        ("0 8 raid raid1 2 AA 8/8 idle 0 0 -", Intent.PAUSE, MirrorState.PAUSED),
        ("0 8 raid raid1 2 AA 8/8 idle 0 0 -", Intent.BREAK, MirrorState.BROKEN),
        (None, Intent.MIRROR, MirrorState.RESYNC_PENDING),
    ],
)
def test_states_carry_the_reference_numbers(line, intent, state):
    assert mirror_state(RaidStatus.parse(line) if line else None, intent) is state
    assert [s.value for s in MirrorState] == [0, 1, 2, 3, 4, 5]


def test_region_doubles_until_the_bitmap_fits():
    assert region_size(128 * GIB) == 64 * 1024
    assert region_size(128 * GIB + 512) == 128 * 1024
    assert region_size(1024 * GIB, 4096) == 512 * 1024
    for wanted in (0, 1000, 3 * 4096, 2048):
        with pytest.raises(InvalidArgument, match="region size"):
            region_size(GIB, wanted)


@pytest.mark.parametrize("size", [0, -512, 1000])
def test_volume_sizes_are_whole_sectors(size):
    with pytest.raises(InvalidArgument, match="mirror size"):
        Volume("v", "/dev/vda", size)


class FakeKernel:
    """Answers the tools the mirror runs: one free NBD device, and no device mapped but
    those given a status line."""

    def __init__(self, statuses=None):
        self.calls = []
        self.statuses = statuses or {}

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[:2] == ["dmsetup", "status"] and argv[2] in self.statuses:
            return self.statuses[argv[2]]
        if argv[:2] in (["dmsetup", "table"], ["dmsetup", "status"]):
            raise KernelError("No such device")
        if argv[0] == "losetup":
            return "" if "-j" in argv else "/dev/loop3\n"
        return ""

    def created(self, name):
        return next(call[-1] for call in self.calls if call[:3] == ["dmsetup", "create", name])


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(Mirror, "_free_nbd", staticmethod(lambda: "/dev/nbd0"))
    return FakeKernel()


def raid_table(kernel, state_dir, volume):
    Mirror(volume, state_dir, DeviceMapper(kernel)).assemble(PeerEndpoint("10.99.0.2"))
    return kernel.created(bridge.PREFIX + volume.name)


def test_a_new_mirror_rebuilds_the_peer_leg_from_the_local_disk(kernel, tmp_path):
    volume = Volume("v1", "/dev/vdb", GIB)
    table = raid_table(kernel, tmp_path, volume)
    assert table == (
        f"0 {GIB // 512} raid raid1 7 0 region_size 128 write_mostly 1 rebuild 1 2 "
        "/dev/loop3 /dev/vdb /dev/mapper/applianced-repl-v1-pmeta /dev/mapper/applianced-repl-v1-pdata"
    )
    assert ["nbd-client", "10.99.0.2", "10809", "/dev/nbd0", "-N", "v1", "-b", "4096", "-t", "5", "-C", "1"] in (
        kernel.calls
    )
    assert kernel.created("applianced-repl-v1-pdata") == f"0 {GIB // 512} linear /dev/nbd0 {bridge.META_SECTORS}"
    assert (tmp_path / "replication" / "v1.meta").stat().st_size == bridge.META_SECTORS * 512


def test_a_mirror_with_a_superblock_is_never_rebuilt(kernel, tmp_path):
    (tmp_path / "replication").mkdir()
    (tmp_path / "replication" / "v1.meta").write_bytes(RAID_MAGIC + bytes(bridge.META_SECTORS * 512 - 4))
    table = raid_table(kernel, tmp_path, Volume("v1", "/dev/vdb", GIB))
    assert " rebuild " not in table and " nosync" not in table


def test_a_blank_pair_skips_the_initial_copy(kernel, tmp_path):
    volume = Volume("v1", "/dev/vdb", GIB)
    Mirror(volume, Path(tmp_path), DeviceMapper(kernel)).assemble(PeerEndpoint("10.99.0.2"), copy_all=False)
    assert " nosync 2 " in kernel.created("applianced-repl-v1")


@pytest.mark.parametrize(
    ("health", "listening", "resumed"),
    [(None, True, False), ("AA", True, False), ("AD", False, False), ("AD", True, True)],
)
def test_a_dead_leg_is_resumed_only_when_the_peer_answers(kernel, tmp_path, health, listening, resumed):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        if listening:
            server.listen()
        port = server.getsockname()[1]
        if health:
            kernel.statuses["applianced-repl-v1"] = f"0 8 raid raid1 2 {health} 8/8 idle 0 0 -"
        mirror = Mirror(Volume("v1", "/dev/vdb", GIB), tmp_path, DeviceMapper(kernel))
        assert mirror.resume(PeerEndpoint("127.0.0.1", port), probe_timeout=1) is resumed
    assert any(call[0] == "nbd-client" for call in kernel.calls) is resumed
