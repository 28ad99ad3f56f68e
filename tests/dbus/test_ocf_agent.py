"""The OCF resource agent: metadata for Pacemaker and a monitor that asks the daemon."""

import os
import subprocess
import xml.etree.ElementTree as ET

from tests.support.daemon import CLI, REPO

AGENT = REPO / "agents" / "applianced"


def agent(action, bus_address, appliancectl=str(CLI)):
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus_address, "OCF_RESKEY_appliancectl": appliancectl}
    return subprocess.run([str(AGENT), action], capture_output=True, text=True, env=env, timeout=60)


def test_meta_data_describes_the_actions(bus):
    result = agent("meta-data", bus.address)
    assert result.returncode == 0
    root = ET.fromstring(result.stdout)
    assert root.get("name") == "applianced"
    assert {a.get("name") for a in root.iter("action")} >= {"start", "stop", "monitor", "meta-data", "validate-all"}


def test_monitor_follows_the_daemon(daemon, bus):
    assert agent("monitor", bus.address).returncode == 0
    daemon.stop()
    assert agent("monitor", bus.address).returncode == 7  # OCF_NOT_RUNNING


def test_missing_cli_is_reported_as_not_installed(bus):
    assert agent("validate-all", bus.address, "/nonexistent/appliancectl").returncode == 5
    assert agent("frobnicate", bus.address).returncode == 3
