"""HBA index choice of the configfs builder, on a plain directory standing in for core/."""

from applianced.iscsi.kernel import configfs, configfs_actions
from applianced.iscsi.kernel.configfs_actions import ConfigfsActions


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
