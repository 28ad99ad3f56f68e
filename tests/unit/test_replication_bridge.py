"""The bridge's logic without a kernel: region sizes, what an initial sync copies, md's sysfs
read into a status, and the states with the reference's numbers. That md, device-mapper
and NBD do what the bridge asks is proven in tests/vm/test_replication.py."""

import os

import pytest

from applianced.blockdev import md
from applianced.errors import InvalidArgument, KernelError
from applianced.replication import bridge
from applianced.replication.bridge import Mirror, Volume, allocated_ranges, export_filter, region_size
from applianced.replication.states import Intent, MirrorState, mirror_state

GIB = 1 << 30
REGION = 64 * 1024


def test_region_doubles_until_the_bitmap_fits():
    assert region_size(128 * GIB) == 64 * 1024
    assert region_size(128 * GIB + 512) == 128 * 1024
    assert region_size(1024 * GIB, 4096) == 512 * 1024
    for wanted in (0, 1000, 3 * 4096, 2048):
        with pytest.raises(InvalidArgument, match="region size"):
            region_size(GIB, wanted)


@pytest.mark.parametrize("size", [0, -4096, 1000, 4096 + 512])
def test_a_mirrored_disk_is_whole_4k_blocks(size):
    with pytest.raises(InvalidArgument, match="multiple of 4 KiB"):
        Volume("v", "/dev/vda", False, size)


def test_an_initial_sync_copies_the_regions_that_hold_data_only(tmp_path):
    path = tmp_path / "disk.img"
    size = 64 << 20
    with open(path, "wb") as f:
        f.truncate(size + 4096)  # the trailer after the data is not part of the volume
        for offset in (0, 10 * REGION + 100, 500 * REGION, 1023 * REGION):
            f.seek(offset)
            f.write(b"x" * 4096)
        f.seek(size)
        f.write(b"trailer")
    ranges = allocated_ranges(path, size, REGION)
    # File systems allocate in blocks of their own; every written region is in a range,
    # and most of the file (a hole) is in none.
    covered = {region for start, end in ranges for region in range(start, end)}
    assert {0, 10, 500, 1023} <= covered
    assert len(covered) < 40
    assert all(0 <= start < end <= 1024 for start, end in ranges)


def test_an_empty_sparse_file_copies_nothing(tmp_path):
    path = tmp_path / "blank.img"
    with open(path, "wb") as f:
        f.truncate(GIB)
    assert allocated_ranges(path, GIB, REGION) == []


def fake_array(root, legs, *, action="idle", completed="none", behind=0, used=0):
    sys = root / "md127" / "md"
    (sys / "bitmap").mkdir(parents=True)
    values = {
        "sync_action": action,
        "sync_completed": completed,
        "sync_speed": "none" if action == "idle" else "2048",
        "bitmap/backlog": str(behind),
        "bitmap/max_backlog_used": str(used),
    }
    for name, value in values.items():
        (sys / name).write_text(value + "\n")
    for name, state in legs:
        (sys / f"dev-{name}").mkdir()
        (sys / f"dev-{name}" / "state").write_text(f"{state}\n")
    return md.Array("md127")


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "SYS_BLOCK", tmp_path)
    return tmp_path


def test_md_sysfs_reads_as_a_status(sysfs):
    array = fake_array(
        sysfs,
        [("dm-3", "in_sync"), ("nbd0", "write_mostly")],
        action="recover",
        completed="2048 / 1048576",
        behind=200,
        used=17,
    )
    status = array.status()
    assert [leg.name for leg in status.legs] == ["dm-3", "nbd0"]
    assert status.legs[0].in_sync and not status.legs[1].in_sync and not status.legs[1].faulty
    assert (status.synced, status.sync_total, status.sync_speed) == (2048, 1048576, 2048)
    assert (status.write_behind, status.max_behind_used) == (200, 17)
    assert status.copying


def test_an_idle_array_reports_no_pass_without_reading_one(sysfs):
    # The monitor reads every array each second: an idle one's pass files are not read.
    array = fake_array(sysfs, [("nbd0", "in_sync,write_mostly"), ("dm-3", "in_sync")], completed="8 / 64")
    status = array.status()
    assert (status.synced, status.sync_total, status.sync_speed) == (0, 0, 0)
    assert not status.copying
    assert [leg.name for leg in status.legs] == ["dm-3", "nbd0"]


def test_async_mode_is_set_on_the_peer_leg_and_shown_without_reading_again(sysfs):
    array = fake_array(sysfs, [("dm-3", "in_sync"), ("nbd0", "in_sync,write_mostly")], behind=0)
    status = Mirror._set_write_behind(array, array.status(), 300)
    assert (sysfs / "md127" / "md" / "bitmap" / "backlog").read_text() == "300"
    assert status.write_behind == 300


def test_write_behind_waits_for_a_write_mostly_leg(sysfs):
    # md refuses a backlog without one; connect sets it again with the peer's leg.
    array = fake_array(sysfs, [("dm-3", "in_sync")], behind=0)
    before = array.status()
    assert Mirror._set_write_behind(array, before, 300) is before
    assert (sysfs / "md127" / "md" / "bitmap" / "backlog").read_text() == "0\n"


def test_after_a_role_swap_reads_go_to_the_local_leg_again(sysfs, tmp_path):
    array = fake_array(sysfs, [("dm-3", "in_sync,write_mostly"), ("nbd0", "in_sync")])
    mirror = Mirror(Volume("d1", str(tmp_path / "d1.img"), True, 4096), tmp_path, mapper=object())
    mirror._local_reads(array)
    assert (sysfs / "md127" / "md" / "dev-dm-3" / "state").read_text() == "-writemostly"
    assert (sysfs / "md127" / "md" / "dev-nbd0" / "state").read_text() == "writemostly"


def test_a_value_caught_mid_change_is_read_again(sysfs, monkeypatch):
    array = fake_array(sysfs, [("dm-3", "in_sync"), ("nbd0", "write_mostly")], action="recover", completed="8 / 64")
    torn = ["0 / 131072\n72"]  # as a VM test read it once, as a recovery started
    plain = md.Array.read
    monkeypatch.setattr(
        md.Array, "read", lambda self, name: torn.pop() if name == "sync_completed" and torn else plain(self, name)
    )
    status = array.status()  # the first read is torn, the second is not
    assert (status.synced, status.sync_total) == (8, 64)


def test_a_value_that_stays_unreadable_is_a_kernel_error(sysfs):
    array = fake_array(sysfs, [("dm-3", "in_sync")])
    (sysfs / "md127" / "md" / "bitmap" / "backlog").write_text("one\n")
    with pytest.raises(KernelError, match="cannot read the state of md127"):
        array.status()


def test_an_unreadable_array_is_a_kernel_error(sysfs):
    with pytest.raises(KernelError, match="cannot read the state of md9"):
        md.Array("md9").status()


@pytest.mark.parametrize(
    ("legs", "action", "completed", "intent", "pending", "state"),
    [
        ([("dm-3", "in_sync"), ("nbd0", "in_sync,write_mostly")], "idle", "none", Intent.MIRROR, False, 1),
        ([("dm-3", "in_sync"), ("nbd0", "write_mostly")], "recover", "8 / 64", Intent.MIRROR, False, 2),
        ([("dm-3", "in_sync"), ("nbd0", "write_mostly")], "idle", "none", Intent.MIRROR, False, 5),
        ([("dm-3", "in_sync"), ("nbd0", "faulty,write_mostly")], "idle", "none", Intent.MIRROR, False, 4),
        ([("dm-3", "in_sync")], "idle", "none", Intent.MIRROR, False, 4),
        ([("dm-3", "in_sync")], "idle", "none", Intent.MIRROR, True, 5),
        ([("dm-3", "in_sync"), ("nbd0", "in_sync,write_mostly")], "idle", "none", Intent.PAUSE, False, 4),
        ([("dm-3", "in_sync")], "idle", "none", Intent.BREAK, False, 3),
    ],
)
def test_states_carry_the_reference_numbers(sysfs, legs, action, completed, intent, pending, state):
    status = fake_array(sysfs, legs, action=action, completed=completed).status()
    assert mirror_state(status, intent, pending) == MirrorState(state)
    assert [s.value for s in MirrorState] == [0, 1, 2, 3, 4, 5]


def test_a_mirror_not_assembled_waits_for_its_resync():
    assert mirror_state(None, Intent.MIRROR) is MirrorState.PAUSED
    assert mirror_state(None, Intent.MIRROR, pending=True) is MirrorState.RESYNC_PENDING


def test_the_export_admits_the_peer_only():
    rule = export_filter("10.99.0.2", 10810, "10.99.0.1")
    assert (rule.address, rule.port, [str(n) for n in rule.networks], rule.what) == (
        "10.99.0.2",
        10810,
        ["10.99.0.1/32"],
        "replication export",
    )


def test_free_array_names_skip_the_ones_in_use(sysfs):
    for name in ("md100", "md101", "md127"):
        (sysfs / name).mkdir()
    assert md.free_array_name() == "/dev/md102"
    assert os.path.basename(md.free_array_name(200)) == "md200"


@pytest.mark.parametrize(
    ("before", "after"), [(65536, bridge.AIO_EVENTS), (4 * bridge.AIO_EVENTS, 4 * bridge.AIO_EVENTS)]
)
def test_the_node_makes_room_for_its_copies_aio_contexts_and_never_lowers_it(tmp_path, monkeypatch, before, after):
    limit = tmp_path / "aio-max-nr"
    limit.write_text(f"{before}\n")
    monkeypatch.setattr(bridge, "AIO_MAX_NR", limit)
    bridge.make_room_for_aio()
    assert int(limit.read_text()) == after


def test_a_node_that_may_not_raise_the_aio_limit_says_so_and_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(bridge, "AIO_MAX_NR", tmp_path / "no-such-sysctl")
    bridge.make_room_for_aio()
    assert "fs.aio-max-nr stays as it is" in caplog.text


def test_the_stand_in_data_path_has_no_method_the_kernel_one_lacks():
    # The service's tests run on the stand-in: a method it has and the real one lost (a
    # function pasted into the class's middle once took four) would pass them all.
    from tests.support.fake_datapath import FakeDataPath

    def methods(cls):
        return {name for name in vars(cls) if callable(getattr(cls, name)) and not name.startswith("_")}

    assert methods(FakeDataPath) <= methods(bridge.DataPath)
