"""The state file: round trip, atomic replacement, permissions, versioning."""

import json
import stat

import pytest

from applianced.errors import StateError
from applianced.state import Acl, Config, Disk, Lun, Portal, StateStore, Target


def sample_config() -> Config:
    config = Config.new()
    config = config.with_disk(Disk("d1", "/srv/d1.img", 1 << 30, "b7a9c0de-0000-4000-8000-000000000001", "db"))
    target = Target("t1", "iqn.2003-01.org.example:t1", luns=(Lun(0, "d1"),), acls=(Acl("iqn.1994-05.com.example:c"),))
    config = config.with_target(target)
    return Config(config.node_id, config.iqn_prefix, config.disks, config.targets, (Portal("fd00::1", 3260),))


def test_round_trip(tmp_path):
    store = StateStore(tmp_path / "state", "state.json")
    assert store.load() is None
    config = sample_config()
    store.save(config)
    assert store.load() == config


def test_file_is_private_and_no_temporary_files_remain(tmp_path):
    store = StateStore(tmp_path / "state", "state.json")
    store.save(sample_config())
    store.save(sample_config())
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert [p.name for p in store.directory.iterdir()] == ["state.json"]


def test_unknown_version_is_refused(tmp_path):
    store = StateStore(tmp_path, "state.json")
    store.path.write_text(json.dumps({"version": 99, "node": {"id": "x"}}))
    with pytest.raises(StateError, match="version 99"):
        store.load()


@pytest.mark.parametrize("text", ["{not json", '{"version": 1}', '{"version": 1, "node": {"id": "x"}, "disks": [{}]}'])
def test_corrupt_file_is_refused(tmp_path, text):
    store = StateStore(tmp_path, "state.json")
    store.path.write_text(text)
    with pytest.raises(StateError):
        store.load()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    store = StateStore(tmp_path, "state.json")
    store.save(sample_config())
    before = store.path.read_bytes()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(StateError, match="Input/output error"):
        store.save(Config.new())
    assert store.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
