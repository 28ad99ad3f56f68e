"""LIO through configfs on plain directories standing in for it: the builder's HBA index
choice, and the files where LIO saves persistent reservations."""

import stat

from applianced.iscsi.kernel import configfs, configfs_actions
from applianced.iscsi.kernel.configfs_actions import ConfigfsActions
from applianced.iscsi.kernel.lio import LioKernel


def test_new_hbas_take_the_lowest_free_index_and_step_around_other_tools(tmp_path, monkeypatch):
    core = tmp_path / "core"
    core.mkdir()
    for name in ("fileio_0", "iblock_2", "alua"):
        (core / name).mkdir()
    monkeypatch.setattr(configfs, "CORE", str(core))
    monkeypatch.setattr(configfs_actions, "HBA_INDEX_LOCK", str(tmp_path / "lock"))
    builder = ConfigfsActions()
    assert builder._make_hba("fileio") == f"{core}/fileio_1"
    # Another tool takes the next free index after this run listed core/.
    (core / "fileio_3").mkdir()
    assert builder._make_hba("fileio") == f"{core}/fileio_4"
    assert builder._make_hba("iblock") == f"{core}/iblock_5"
    assert sorted(p.name for p in core.iterdir()) == [
        "alua", "fileio_0", "fileio_1", "fileio_3", "fileio_4", "iblock_2", "iblock_5"
    ]  # fmt: skip


def test_saved_reservations_are_read_and_kept_where_lio_saves_them(tmp_path, monkeypatch):
    root = tmp_path / "target"
    root.mkdir()
    (root / "dbroot").write_text(f"{tmp_path / 'etc-target'}\n")
    monkeypatch.setattr(configfs, "TARGET_ROOT", str(root))
    kernel = LioKernel()
    assert kernel.saved_reservations(["s1"]) == {"s1": ""}
    kernel.keep_reservations("s1", "PR_REG_START: 0\nsa_res_key=1\nPR_REG_END: 0\n")
    kept = tmp_path / "etc-target" / "pr" / "aptpl_s1"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kernel.saved_reservations(["s1", "s2"]) == {"s1": kept.read_text(), "s2": ""}
    kernel.keep_reservations("s1", "")
    assert not kept.exists()
