"""Missing disks on a real kernel: a degraded start that serves the rest, and healing.

One node guest, with open-iscsi in the same guest as the initiator. A disk file on an
ext4 file system that is not mounted at start: the daemon starts, the other target
serves, and mounting the file system brings the LUN back with no restart. A drive pulled
out of the running guest through QEMU's monitor turns its disk missing.
"""

import pytest

from tests.vm.appliance import ApplianceNode
from tests.vm.harness import Disk

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:missing-client"
PORTAL = "127.0.0.1"
MOUNT = "/srv/fs"
PREFIX = "iqn.2003-01.org.linux-iscsi.applianced"
CONFIGFS = "/sys/kernel/config/target"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    guest = module_guest_factory("missing", disks=[Disk("fs", "64M"), Disk("pull", "32M", bus="scsi")])
    appliance = ApplianceNode(guest).prepare(initiator_name=INITIATOR)
    guest.run(f"mkfs.ext4 -q {guest.disk_device('fs')} && mkdir -p {MOUNT}")
    guest.run(f"mount {guest.disk_device('fs')} {MOUNT}")
    appliance.start()
    return appliance


def disks(node):
    return {d["name"]: d for d in node.ctl_json("disk", "list")}


def lun0(target):
    return f"{CONFIGFS}/iscsi/{PREFIX}:{target}/tpgt_1/lun/lun_0"


def test_a_file_system_missing_at_start_degrades_then_heals_on_mount(node):
    guest = node.guest
    node.ctl_batch(
        ("disk", "create", "d1", "16M"),
        ("disk", "create", "d2", "16M", "--path", f"{MOUNT}/d2.img"),
        ("target", "create", "t1"),
        ("target", "create", "t2"),
        ("portal", "create", PORTAL),
        ("lun", "add", "t1", "d1"),
        ("lun", "add", "t2", "d2"),
        ("acl", "add", "t1", INITIATOR),
        ("acl", "add", "t2", INITIATOR),
    )
    serials = {name: disk["serial"] for name, disk in disks(node).items()}
    node.stop()
    # A reboot whose disk file system did not mount: LIO is empty, the file is not there.
    node.clear_kernel_state()
    guest.run(f"umount {MOUNT}")
    node.start()

    listed = disks(node)
    assert (listed["d1"]["status"], listed["d2"]["status"]) == ("online", "missing")
    assert "d2.img does not exist" in listed["d2"]["reason"]
    assert guest.run(f"test -e {lun0('t1')}", check=False).rc == 0
    assert guest.run(f"test -e {lun0('t2')}", check=False).rc != 0, "no LUN serves zeros in d2's place"
    assert not guest.run(f"ls {MOUNT}").stdout.strip(), "the daemon created no file in the empty mount point"
    assert "disk d2 is missing" in node.log()

    # The other target serves an initiator; t2 is there, without its LUN.
    assert sorted(node.discover(PORTAL)) == [f"{PREFIX}:t1", f"{PREFIX}:t2"]
    for target in ("t1", "t2"):
        node.login(f"{PREFIX}:{target}", PORTAL)
    device = node.device_for_serial(serials["d1"])
    guest.run(f"head -c 1M /dev/urandom > /tmp/d1.bin && dd if=/tmp/d1.bin of={device} oflag=direct status=none")
    assert guest.run(f"dd if={device} bs=1M count=1 iflag=direct status=none | cmp - /tmp/d1.bin", check=False).rc == 0

    # The file system comes back: the LUN follows without a restart, with d2's identity.
    guest.run(f"mount {guest.disk_device('fs')} {MOUNT}")
    guest.wait_until(f"test -e {lun0('t2')}", timeout=60)
    assert disks(node)["d2"]["status"] == "online"
    guest.run("iscsiadm -m session -R && udevadm settle")
    d2 = node.device_for_serial(serials["d2"])
    guest.run(f"dd if=/dev/urandom of={d2} bs=1M count=1 oflag=direct status=none")
    assert "disk d2 is back" in node.log()


def test_a_pulled_drive_turns_its_disk_missing(node):
    guest = node.guest
    by_id = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_pull"
    guest.disk_device("pull")  # waits for udev's link
    node.ctl_batch(
        ("disk", "create-block", "d3", by_id),
        ("target", "create", "t3"),
        ("lun", "add", "t3", "d3"),
        ("acl", "add", "t3", INITIATOR),
    )
    assert f"{PREFIX}:t3" in node.discover(PORTAL)
    node.login(f"{PREFIX}:t3", PORTAL)
    node.device_for_serial(disks(node)["d3"]["serial"])

    guest.unplug_disk("pull")
    # udev reports the removal; the daemon takes the LUN and the backstore out of LIO.
    guest.wait_until(f"! test -e {lun0('t3')}", timeout=60)
    assert guest.run(f"ls -d {CONFIGFS}/core/*/d3", check=False).rc != 0
    listed = disks(node)["d3"]
    assert listed["status"] == "missing" and "is gone" in listed["reason"]
    assert "disk d3 is missing" in node.log()
    # Everything else still serves.
    assert guest.run(f"test -e {lun0('t1')} && test -e {lun0('t2')}", check=False).rc == 0
