"""A disk file system that did not mount: the daemon starts degraded and heals by itself.

The disk files of d2 live on a bind mount. After a "reboot" without that mount the
daemon starts, serves t1, shows d2 as missing; mounting the file system brings d2's LUN
back with no restart (the daemon follows /proc/self/mountinfo and looks again).
"""

import json
import subprocess
import time

import pytest

from tests.support.daemon import INITIATOR

WAIT = 30.0


@pytest.fixture
def mount_point(tmp_path):
    """A directory that a test may bind-mount onto; unmounted again at the end."""
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-q", str(point)], check=False)


def status(daemon):
    return {d["name"]: d["status"] for d in daemon.cli("--json", "disk", "list").json()}


def wait_for(predicate, what):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {WAIT} s: {what}")


def test_a_missing_disk_file_system_degrades_the_start_and_heals_on_mount(daemon, tmp_path, mount_point):
    real = tmp_path / "fs"
    real.mkdir()
    subprocess.run(["mount", "--bind", str(real), str(mount_point)], check=True)
    for args in (
        ("disk", "create", "d1", "1M", "--path", str(tmp_path / "d1.img")),
        ("disk", "create", "d2", "1M", "--path", str(mount_point / "d2.img")),
        ("target", "create", "t1"),
        ("target", "create", "t2"),
        ("portal", "create", "127.0.0.1"),
        ("lun", "add", "t1", "d1"),
        ("lun", "add", "t2", "d2"),
        ("acl", "add", "t2", INITIATOR),
    ):
        assert daemon.cli(*args).returncode == 0, args
    daemon.stop()
    subprocess.run(["umount", str(mount_point)], check=True)
    daemon.kernel_file.unlink()  # a reboot whose disk file system did not mount
    daemon.start()

    assert status(daemon) == {"d1": "online", "d2": "missing"}
    (d2,) = [d for d in daemon.cli("--json", "disk", "list").json() if d["name"] == "d2"]
    assert "d2.img does not exist" in d2["reason"]
    kernel = json.loads(daemon.kernel_file.read_text())
    luns = {t["iqn"].rsplit(":", 1)[1]: t["luns"] for t in kernel["targets"]}
    assert luns == {"t1": {"0": "d1"}, "t2": {}}, "t1 serves; t2 is up without its LUN"
    assert "disk d2 is missing" in daemon.log_text()
    # Changes that do not need d2 work; those that do are refused by name.
    assert daemon.cli("target", "create", "t3").returncode == 0
    refused = daemon.cli("lun", "add", "t3", "d2")
    assert refused.returncode == 7 and "missing" in refused.stderr

    subprocess.run(["mount", "--bind", str(real), str(mount_point)], check=True)
    wait_for(lambda: status(daemon)["d2"] == "online", "d2 online")
    kernel = json.loads(daemon.kernel_file.read_text())
    assert {t["iqn"].rsplit(":", 1)[1]: t["luns"] for t in kernel["targets"]}["t2"] == {"0": "d2"}
    assert "disk d2 is back" in daemon.log_text()
