"""tools/install-node: a node installation below DESTDIR (pip from the registry, no apt)."""

import subprocess
from pathlib import Path

from applianced.constants import BUS_NAME
from tests.support.daemon import REPO


def test_install_node_places_every_file(tmp_path):
    env = {"DESTDIR": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(
        [str(REPO / "tools" / "install-node")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    for path, mode in (
        ("etc/systemd/system/applianced.service", 0o644),
        (f"usr/share/dbus-1/system.d/{BUS_NAME}.conf", 0o644),
        ("etc/udev/rules.d/70-applianced-lio-serial.rules", 0o644),
        ("etc/udev/rules.d/64-applianced-storage.rules", 0o644),
        ("usr/lib/ocf/resource.d/applianced/applianced", 0o755),
        ("var/lib/applianced", 0o700),
    ):
        assert (tmp_path / path).stat().st_mode & 0o777 == mode, path
    assert (tmp_path / "usr/local/sbin/applianced").readlink() == Path("/opt/applianced/bin/applianced")
    version = subprocess.run(
        [str(tmp_path / "opt/applianced/bin/applianced"), "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("applianced ")
