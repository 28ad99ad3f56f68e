"""Whole-configuration moves on a real kernel: migrating a live targetcli setup, and
export → wipe → import."""

import pytest

from tests.vm.appliance import ApplianceNode

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:config-client"
LEGACY_IQN = "iqn.2003-01.org.linux-iscsi.oldhost.x8664:sn.0123456789ab"
PORTAL = "127.0.0.1"
# What targetcli does, through the same rtslib, with Debian's own Python and packages.
LEGACY_SETUP = f"""
import rtslib_fb as r
so = r.FileIOStorageObject("legacy", dev="/var/lib/legacy.img", size=16 * 2**20)
tpg = r.TPG(r.Target(r.FabricModule("iscsi"), "{LEGACY_IQN}"), 1)
tpg.set_attribute("authentication", "0")
tpg.set_attribute("generate_node_acls", "0")
r.NetworkPortal(tpg, "0.0.0.0", 3260)
lun = r.LUN(tpg, 0, so)
r.MappedLUN(r.NodeACL(tpg, "{INITIATOR}"), 0, lun)
tpg.enable = True
"""


@pytest.fixture(scope="module")
def node(module_guest_factory):
    return ApplianceNode(module_guest_factory("config")).prepare(initiator_name=INITIATOR)


def read_back(node, device):
    check = f"dd if={device} bs=1M count=1 iflag=direct status=none | cmp - /tmp/data.bin"
    return node.guest.run(check, check=False).rc == 0


def test_migrating_a_live_targetcli_setup_keeps_its_session(node):
    guest = node.guest
    guest.run("truncate -s 16M /var/lib/legacy.img")
    guest.run(["/usr/bin/python3", "-c", LEGACY_SETUP])
    guest.run("targetctl save /tmp/saveconfig.json")
    assert node.discover(PORTAL) == [LEGACY_IQN]
    node.login(LEGACY_IQN, PORTAL)
    serial = guest.run("cat /sys/kernel/config/target/core/fileio_*/legacy/wwn/vpd_unit_serial").stdout.split()[-1]
    device = node.device_for_serial(serial)
    guest.run(f"head -c 1M /dev/urandom > /tmp/data.bin && dd if=/tmp/data.bin of={device} oflag=direct status=none")
    session = guest.run("iscsiadm -m session").stdout

    node.start()
    assert node.lio_targets() == [LEGACY_IQN], "applianced leaves objects it does not manage alone"
    node.ctl("config", "import-targetcli", "/tmp/saveconfig.json")
    (target,) = node.ctl_json("target", "list")
    assert (target["iqn"], target["luns"], target["acls"]) == (LEGACY_IQN, 1, 1)
    (disk,) = node.ctl_json("disk", "list")
    assert (disk["name"], disk["serial"], disk["size"]) == ("legacy", serial, 16 << 20)
    assert guest.run("iscsiadm -m session").stdout == session, "the session survived the migration"
    assert read_back(node, device)
    node.logout(LEGACY_IQN, PORTAL)


def test_export_wipe_import_round_trip(node):
    guest = node.guest
    node.ctl("config", "export", "--output", "/tmp/export.json")
    assert guest.run("stat -c %a /tmp/export.json").stdout.strip() == "600"
    assert node.stop() == 0
    node.clear_kernel_state()
    guest.run("rm /var/lib/applianced/state.json")
    node.start()
    assert node.lio_targets() == [] and node.ctl_json("target", "list") == []

    node.ctl("config", "import", "/tmp/export.json")
    assert node.lio_targets() == [LEGACY_IQN]
    (disk,) = node.ctl_json("disk", "list")
    node.login(LEGACY_IQN, PORTAL)
    try:
        assert read_back(node, node.device_for_serial(disk["serial"]))
    finally:
        node.logout(LEGACY_IQN, PORTAL)
    refused = node.ctl("config", "import", "/etc/hostname", check=False)
    assert refused.rc == 5 and "not valid JSON" in refused.stderr
