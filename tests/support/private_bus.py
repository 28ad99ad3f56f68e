"""A private system bus for tests: Debian's system-bus configuration with our policy file.

The configuration is derived from the distribution's own ``system.conf`` (same default
deny rules) with its listen address, user, pid file and service helpers removed, and the
project's real policy file included, so that the policy under test is the one we ship.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SYSTEM_CONF = Path("/usr/share/dbus-1/system.conf")
DROPPED = {
    "user",
    "fork",
    "pidfile",
    "syslog",
    "servicehelper",
    "standard_system_servicedirs",
    "listen",
    "include",
    "includedir",
}
DOCTYPE = (
    '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
)


def bus_config(socket_path: Path, policy: Path) -> str:
    root = ET.parse(SYSTEM_CONF).getroot()
    for element in [e for e in root if e.tag in DROPPED]:
        root.remove(element)
    ET.SubElement(root, "listen").text = f"unix:path={socket_path}"
    ET.SubElement(root, "include").text = str(policy.resolve())
    return DOCTYPE + ET.tostring(root, encoding="unicode")


class PrivateBus:
    """A dbus-daemon on a socket that every local user can reach (for the policy tests)."""

    def __init__(self, policy: Path) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="applianced-bus-"))
        self.directory.chmod(0o755)
        self.socket = self.directory / "system_bus_socket"
        self.config = self.directory / "bus.conf"
        self.config.write_text(bus_config(self.socket, policy))
        self.address = f"unix:path={self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--nosyslog"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dbus-daemon did not start: {self.process.stderr.read().decode()}")
            time.sleep(0.02)
        os.chmod(self.socket, 0o777)

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)
