"""A disk whose backing is absent is missing: left out of the kernel, everything else served."""

import json
import logging
import os
import stat

import pytest

from applianced.errors import NotSupported
from applianced.iscsi import presence
from applianced.state import Config, Disk, Lun, Target
from tests.unit.test_engine import INITIATOR, make_engine, run, started

T1 = "iqn.2003-01.org.linux-iscsi.applianced:t1"
T2 = "iqn.2003-01.org.linux-iscsi.applianced:t2"


async def rebooted_without_d2(tmp_path, lose_d2):
    """t1 exports d1 and t2 exports d2 (files in tmp_path); after ``lose_d2(tmp_path)``, a
    reboot (LIO wiped) and a new start of the engine, which it returns."""
    engine = await started(make_engine(tmp_path))
    for n in ("1", "2"):
        await engine.create_disk(f"d{n}", 1 << 20, path=str(tmp_path / f"d{n}.img"))
        await engine.create_target(f"t{n}")
        await engine.add_lun(f"t{n}", f"d{n}")
        await engine.add_acl(f"t{n}", INITIATOR)
    await engine.create_portal("10.1.0.5", 3260)
    lose_d2(tmp_path)
    engine.kernel.wipe()
    return await started(make_engine(tmp_path, engine.kernel))


def test_a_start_with_one_disk_missing_serves_the_other_and_brings_it_back(tmp_path, caplog):
    async def scenario():
        with caplog.at_level(logging.WARNING):
            # The disk's file system did not mount.
            engine = await rebooted_without_d2(tmp_path, lambda d: (d / "d2.img").rename(d / "away.img"))
        kernel = engine.kernel
        assert set(engine.missing) == {"d2"} and "does not exist" in engine.missing["d2"]
        assert "disk d2 is missing" in caplog.text
        snapshot = kernel.snapshot()
        assert set(snapshot.storage_objects) == {"d1"}
        assert snapshot.targets[T1].luns == {0: "d1"}
        assert snapshot.targets[T2].luns == {} and snapshot.targets[T2].enabled, "t2 serves, without its LUN"
        assert engine.store.load() == engine.config, "the configuration still has the disk"
        # Nothing changes while it stays away.
        assert not await engine.refresh_disks()
        (tmp_path / "away.img").rename(tmp_path / "d2.img")
        assert await engine.refresh_disks()
        assert engine.missing == {}
        assert kernel.snapshot().targets[T2].luns == {0: "d2"}

    run(scenario())


def test_changes_that_do_not_need_a_missing_disk_work(tmp_path):
    async def scenario():
        engine = await rebooted_without_d2(tmp_path, lambda d: (d / "d2.img").unlink())
        kernel = engine.kernel
        # What needs the disk is refused by name, and changes nothing.
        await engine.create_target("t3")
        with pytest.raises(NotSupported, match=r"d2.*missing"):
            await engine.add_lun("t3", "d2")
        with pytest.raises(NotSupported, match="missing"):
            await engine.extend_disk("d2", 2 << 20)
        # Everything else works: other disks, the missing disk's description, its LUN's removal.
        await engine.create_disk("d3", 1 << 20, path=str(tmp_path / "d3.img"))
        await engine.add_lun("t3", "d3")
        await engine.modify_disk("d2", description="on the shelf")
        await engine.remove_lun("t2", 0)
        # The node exports and re-imports its own configuration while the disk is missing.
        await engine.import_configuration(json.dumps(engine.export_configuration()), force=True)
        assert set(engine.missing) == {"d2"}
        assert set(kernel.snapshot().storage_objects) == {"d1", "d3"}
        await engine.delete_disk("d2")
        assert engine.missing == {}

    run(scenario())


def test_a_file_of_another_disk_at_the_path_is_not_served(tmp_path):
    async def scenario():
        def replace_by_d1(directory):
            (directory / "d2.img").unlink()
            (directory / "d2.img").hardlink_to(directory / "d1.img")

        engine = await rebooted_without_d2(tmp_path, replace_by_d1)
        assert "holds disk 'd1'" in engine.missing["d2"]
        assert "d2" not in engine.kernel.snapshot().storage_objects

    run(scenario())


def test_a_block_device_that_vanishes_turns_its_disk_missing(tmp_path, monkeypatch):
    """Logic only (the device's presence is faked); a hot-unplug in a guest is in tests/vm."""
    device = "/dev/disk/by-id/virtio-blk1"
    present = {device}
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        if path == device:
            if device not in present:
                raise FileNotFoundError(2, "No such file or directory")
            return os.stat_result((stat.S_IFBLK | 0o660, *(0,) * 9))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(presence.os, "stat", fake_stat)

    async def scenario():
        blk = Disk("blk", device, 1 << 20, "5f0c4a52-7a1d-4c1b-9d0e-8c9a0f3b2a12", kind="block")
        config = Config.new().with_disk(blk).with_target(Target("t1", T1, luns=(Lun(0, "blk"),)))
        make_engine(tmp_path).store.save(config)
        engine = await started(make_engine(tmp_path))
        assert engine.kernel.snapshot().targets[T1].luns == {0: "blk"}
        assert not await engine.refresh_disks()
        present.clear()
        assert await engine.refresh_disks()
        assert "is gone" in engine.missing["blk"]
        assert "blk" not in engine.kernel.snapshot().storage_objects
        assert engine.kernel.snapshot().targets[T1].luns == {}
        present.add(device)
        assert await engine.refresh_disks()
        assert engine.kernel.snapshot().targets[T1].luns == {0: "blk"}

    run(scenario())
