"""Files the project installs besides Python code: systemd unit, bus policy, API document."""

import shutil
import subprocess
import xml.etree.ElementTree as ET

from applianced.constants import BUS_NAME
from tests.support.daemon import REPO


def test_systemd_unit_is_valid():
    assert shutil.which("systemd-analyze"), "systemd-analyze is installed by tools/setup (systemd)"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(REPO / "systemd" / "applianced.service")], capture_output=True, text=True
    )
    # The only complaint allowed is that the daemon is not installed on the test machine.
    problems = [line for line in result.stderr.splitlines() if "/usr/local/sbin/applianced" not in line and line]
    assert problems == []


def test_unit_declares_readiness_watchdog_and_no_teardown():
    unit = (REPO / "systemd" / "applianced.service").read_text()
    settings = ("Type=notify", "WatchdogSec=", "KillMode=process", "Conflicts=target.service", f"BusName={BUS_NAME}")
    for setting in settings:
        assert setting in unit


def test_policy_is_fail_closed():
    root = ET.parse(REPO / "dbus" / f"{BUS_NAME}.conf").getroot()
    default = next(p for p in root.iter("policy") if p.get("context") == "default")
    allowed = {(rule.get("send_interface"), rule.get("send_member")) for rule in default.iter("allow")}
    assert allowed == {
        ("org.freedesktop.DBus.Introspectable", None),
        ("org.freedesktop.DBus.Peer", None),
        ("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
        ("org.freedesktop.DBus.Properties", "Get"),
        ("org.freedesktop.DBus.Properties", "GetAll"),
        # A read of the recently seen initiators, no change.
        ("org.applianced.Appliance1.Manager", "ListSeenInitiators"),
        # A read of one volume's replication state, for monitoring scripts.
        ("org.applianced.Appliance1.Manager", "GetVolumeState"),
    }
    assert all(rule.get("send_destination") == BUS_NAME for rule in default.iter("allow"))
