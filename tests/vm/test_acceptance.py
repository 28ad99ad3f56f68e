"""Acceptance of the first slice on a real kernel: LIO target, open-iscsi and libiscsi.

One guest plays both the storage node (applianced on the guest's system bus, driven by
appliancectl) and the initiators, over loopback. Every check reads the kernel or the
initiator, never applianced's own view.
"""

import pytest

from tests.vm.appliance import ApplianceNode

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:client1"
STRANGER = "iqn.2026-11.org.applianced.test:stranger"
PORTAL = "127.0.0.1"
DATA = "/tmp/data.bin"
SIZE_MIB = 32
RESERVATION_KEY = "0xa5a5f00d"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    guest = module_guest_factory("node1", memory="1536M")
    appliance = ApplianceNode(guest).prepare(initiator_name=INITIATOR)
    appliance.start()
    return appliance


def read_back(node, device):
    """Compare the first SIZE_MIB of ``device`` with DATA, bypassing the page cache."""
    return node.guest.run(f"dd if={device} bs=1M count={SIZE_MIB} iflag=direct status=none | cmp - {DATA}", check=False)


def test_first_slice_end_to_end(node):
    guest = node.guest
    node.ctl("disk", "create", "d1", "64M")
    node.ctl("target", "create", "t1")
    node.ctl("portal", "create", PORTAL)
    node.ctl("lun", "add", "t1", "d1")
    node.ctl("acl", "add", "t1", INITIATOR)
    (disk,) = node.ctl_json("disk", "list")
    (target,) = node.ctl_json("target", "list")
    iqn = target["iqn"]
    assert node.lio_targets() == [iqn]

    # Discovery and login with open-iscsi; the LUN is found by its unit serial.
    assert node.discover(PORTAL) == [iqn]
    node.login(iqn, PORTAL)
    device = node.device_for_serial(disk["serial"])
    assert guest.run(f"blockdev --getsize64 {device}").stdout.strip() == str(64 << 20)
    sessions = node.ctl_json("target", "sessions", "t1")
    assert [s["initiator"] for s in sessions] == [INITIATOR]
    assert node.ctl_json("target", "list")[0]["status"] == "logged in (1)"

    # 32 MiB of random data, written with O_DIRECT through the iSCSI session.
    guest.run(f"head -c {SIZE_MIB}M /dev/urandom > {DATA}")
    guest.run(f"dd if={DATA} of={device} bs=1M oflag=direct status=none")

    # Restarting the daemon must not disturb the session: same session, no kernel change.
    session_before = node.session_states()
    assert node.stop() == 0
    assert node.lio_targets() == [iqn], "SIGTERM must leave LIO as it is"
    node.start()
    assert "reconciled at start-up with 0 change(s)" in node.log()
    assert node.session_states() == session_before
    assert read_back(node, device).returncode == 0
    guest.run(f"dd if={DATA} of={device} bs=1M seek={SIZE_MIB} oflag=direct status=none")

    node.logout(iqn, PORTAL)
    assert node.ctl_json("target", "list")[0]["status"] == "idle"
    # The bytes landed in the backing file, at the right offsets.
    assert guest.run(f"cmp -n {SIZE_MIB << 20} {DATA} {disk['path']}", check=False).returncode == 0
    assert (
        guest.run(f"cmp -i 0:{SIZE_MIB << 20} -n {SIZE_MIB << 20} {DATA} {disk['path']}", check=False).returncode == 0
    )


def test_initiator_outside_the_acl_is_refused(node):
    (target,) = node.ctl_json("target", "list")
    url = f"iscsi://{PORTAL}/{target['iqn']}/0"
    # libiscsi as a second, independent initiator: allowed IQN first, to prove the path.
    allowed = node.guest.run(["iscsi-inq", "-i", INITIATOR, url], check=False)
    assert allowed.returncode == 0, allowed.describe()
    assert "LIO-ORG" in allowed.stdout
    refused = node.guest.run(["iscsi-inq", "-i", STRANGER, url], check=False)
    assert refused.returncode != 0
    assert "LIO-ORG" not in refused.stdout
    # The stranger does not even see the target in SendTargets discovery.
    listing = node.guest.run(["iscsi-ls", "-i", STRANGER, f"iscsi://{PORTAL}"], check=False)
    assert target["iqn"] not in listing.stdout
    listing = node.guest.run(["iscsi-ls", "-i", INITIATOR, f"iscsi://{PORTAL}"], check=False)
    assert target["iqn"] in listing.stdout


def test_reboot_restore_after_kernel_wipe(node):
    (disk,) = node.ctl_json("disk", "list")
    (target,) = node.ctl_json("target", "list")
    # A registration and a reservation that the initiator asks to persist (APTPL): LIO
    # writes them under its dbroot, and the restore must hand them back to the new LUN.
    node.login(target["iqn"], PORTAL)
    device = node.device_for_serial(disk["serial"])
    node.reserve_persistently(device, RESERVATION_KEY)
    node.logout(target["iqn"], PORTAL)
    assert node.stop() == 0
    node.clear_kernel_state()
    assert node.lio_targets() == []
    node.start()
    assert node.lio_targets() == [target["iqn"]]
    assert node.ctl_json("disk", "list")[0]["serial"] == disk["serial"]
    node.login(target["iqn"], PORTAL)
    try:
        # Found by the same unit serial as before the wipe: the disk kept its identity.
        device = node.device_for_serial(disk["serial"])
        assert read_back(node, device).returncode == 0, "the restored LUN serves the same bytes"
        node.assert_reserved(device, RESERVATION_KEY)
    finally:
        node.clear_reservations(device, RESERVATION_KEY)
        node.logout(target["iqn"], PORTAL)


def test_a_portal_can_serve_only_some_targets(node):
    (t1,) = node.ctl_json("target", "list")
    node.ctl("disk", "create", "d9", "8M")
    node.ctl("target", "create", "t2")
    node.ctl("lun", "add", "t2", "d9")
    node.ctl("acl", "add", "t2", INITIATOR)
    node.ctl("portal", "create", PORTAL, "--port", "3261", "--target", "t2")
    t2 = next(t for t in node.ctl_json("target", "list") if t["name"] == "t2")
    served = node.guest.run(["iscsi-inq", "-i", INITIATOR, f"iscsi://{PORTAL}:3261/{t2['iqn']}/0"], check=False)
    assert served.rc == 0, served.describe()
    # t1 is not served on that port: LIO finds no portal group for it there.
    other = node.guest.run(["iscsi-inq", "-i", INITIATOR, f"iscsi://{PORTAL}:3261/{t1['iqn']}/0"], check=False)
    assert other.rc != 0
    assert node.guest.run(["iscsi-inq", "-i", INITIATOR, f"iscsi://{PORTAL}/{t1['iqn']}/0"], check=False).rc == 0
