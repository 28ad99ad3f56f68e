"""Virtual disks on a real kernel while an initiator is logged in: online extend, LUN
hot-add (with the REPORTED LUNS DATA HAS CHANGED notice), read-only LUNs, write-back."""

import pytest

from tests.vm.appliance import ApplianceNode
from tests.vm.harness import Disk

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:disks-client"
PORTAL = "127.0.0.1"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    guest = module_guest_factory("disks", disks=[Disk("blk", "64M"), Disk("busy", "16M"), Disk("fs", "64M")])
    appliance = ApplianceNode(guest).prepare(initiator_name=INITIATOR)
    appliance.start()
    appliance.serve("32M", INITIATOR, PORTAL)
    (iqn,) = appliance.discover(PORTAL)
    appliance.login(iqn, PORTAL)
    return appliance


def serial(node, name):
    return next(d["serial"] for d in node.ctl_json("disk", "list") if d["name"] == name)


def size_of(node, device):
    return int(node.guest.run(["blockdev", "--getsize64", device]).stdout)


def rescan(node):
    node.guest.run(["iscsiadm", "-m", "session", "-R"])
    node.guest.run("udevadm settle")


def test_online_extend_is_seen_after_rescan(node):
    device = node.device_for_serial(serial(node, "d1"))
    assert size_of(node, device) == 32 << 20
    node.guest.run(
        f"head -c 1M /dev/urandom > /tmp/head.bin && dd if=/tmp/head.bin of={device} oflag=direct status=none"
    )
    node.ctl("disk", "extend", "d1", "64M")
    rescan(node)
    assert size_of(node, device) == 64 << 20
    # The data in front is untouched, and the new space is usable.
    check = f"dd if={device} bs=1M count=1 iflag=direct status=none | cmp - /tmp/head.bin"
    assert node.guest.run(check, check=False).rc == 0
    node.guest.run(f"dd if=/dev/urandom of={device} bs=1M seek=63 count=1 oflag=direct status=none")
    refused = node.ctl("disk", "extend", "d1", "16M", check=False)
    assert refused.rc == 5 and "shrinking" in refused.stderr


def test_lun_hot_add_notifies_the_logged_in_initiator(node):
    first = node.device_for_serial(serial(node, "d1"))
    node.guest.run("dmesg -C")
    node.ctl("disk", "create", "d2", "16M")
    node.ctl("lun", "add", "t1", "d2", "--read-only")
    # The unit attention is delivered with the next command to a LUN already in use.
    node.guest.run(f"dd if={first} of=/dev/null bs=4k count=1 iflag=direct status=none", check=False)
    node.guest.wait_until("dmesg | grep -q 'LUN assignments on this target have changed'", timeout=30)
    rescan(node)
    second = node.device_for_serial(serial(node, "d2"))
    assert size_of(node, second) == 16 << 20


def test_read_only_lun_refuses_writes(node):
    device = node.device_for_serial(serial(node, "d2"))
    assert node.guest.run(["blockdev", "--getro", device]).stdout.strip() == "1"
    write = node.guest.run(f"dd if=/dev/zero of={device} bs=4k count=1 oflag=direct status=none", check=False)
    assert write.rc != 0
    assert node.guest.run(f"dd if={device} of=/dev/null bs=4k count=1 iflag=direct status=none").rc == 0


def test_write_back_is_opt_in(node):
    # Direct I/O needs a file system that has it (the state directory is a tmpfs here).
    node.guest.run(f"mkfs.ext4 -q {node.guest.disk_device('fs')} && mkdir -p /srv/fs")
    node.guest.run(f"mount {node.guest.disk_device('fs')} /srv/fs")
    created = node.ctl("disk", "create", "wb", "8M", "--write-back", "--path", "/srv/fs/wb.img")
    assert "power cut" in created.stderr
    node.ctl("disk", "create", "wt", "8M", "--path", "/srv/fs/wt.img")

    def direct_io(path):
        return node.guest.run(["losetup", "-j", path, "-n", "-O", "DIO"]).stdout.strip()

    # A write-back disk's loop device goes through the node's page cache; others skip it.
    assert (direct_io("/srv/fs/wb.img"), direct_io("/srv/fs/wt.img")) == ("0", "1")
    assert node.guest.run("cat /sys/kernel/config/target/core/iblock_*/wt/udev_path").stdout.strip() == (
        "/run/applianced/block/applianced-disk-wt"
    )


def test_delete_keeps_the_file_and_import_brings_it_back_with_its_identity(node):
    node.ctl("disk", "create", "mv", "8M")
    lun = node.ctl_json("lun", "list", "t1")
    node.ctl("lun", "add", "t1", "mv")
    number = next(entry["lun"] for entry in node.ctl_json("lun", "list", "t1") if entry["disk"] == "mv")
    assert number not in [entry["lun"] for entry in lun]
    rescan(node)
    original = serial(node, "mv")
    device = node.device_for_serial(original)
    node.guest.run(f"head -c 1M /dev/urandom > /tmp/mv.bin && dd if=/tmp/mv.bin of={device} oflag=direct status=none")
    busy = node.ctl("lun", "remove", "t1", str(number), check=False)
    assert busy.rc == 6 and INITIATOR in busy.stderr
    node.ctl("lun", "remove", "t1", str(number), "--force")
    path = next(d["path"] for d in node.ctl_json("disk", "list") if d["name"] == "mv")
    node.ctl("disk", "delete", "mv")
    node.ctl("disk", "import", path, "--name", "moved")
    assert serial(node, "moved") == original
    node.ctl("lun", "add", "t1", "moved")
    rescan(node)
    device = node.device_for_serial(original)
    check = f"dd if={device} bs=1M count=1 iflag=direct status=none | cmp - /tmp/mv.bin"
    assert node.guest.run(check, check=False).rc == 0


def test_import_refuses_files_applianced_did_not_make(node):
    node.guest.run("dd if=/dev/zero of=/var/lib/applianced/foreign.img bs=1M count=4 status=none")
    refused = node.ctl("disk", "import", "/var/lib/applianced/foreign.img", check=False)
    assert refused.rc == 5 and "not created by applianced" in refused.stderr


def test_forced_logout_drops_the_session_and_keeps_the_configuration(node):
    (target,) = node.ctl_json("target", "list")
    info = f"/sys/kernel/config/target/iscsi/{target['iqn']}/tpgt_1/acls/{INITIATOR}/info"
    before = node.guest.run(f"grep 'LIO Session ID' {info}").stdout
    node.ctl("target", "logout", "t1", INITIATOR)
    # open-iscsi logs in again by itself; a new target-side session proves the old one went.
    node.guest.wait_until(f"grep 'LIO Session ID' {info} | grep -vqF '{before.strip()}'", timeout=90)
    assert node.ctl_json("acl", "list")[0]["initiator"] == INITIATOR
    missing = node.ctl("target", "logout", "t1", "iqn.2026-11.org.applianced.test:nobody", check=False)
    assert missing.rc == 3


def test_block_device_disks(node):
    guest = node.guest
    device = guest.disk_device("blk")
    node.ctl("disk", "create-block", "bd", device)
    disk = next(d for d in node.ctl_json("disk", "list") if d["name"] == "bd")
    assert (disk["kind"], disk["size"]) == ("block", 64 << 20)
    assert disk["path"].startswith("/dev/disk/by-id/"), "stored under its stable name"
    assert guest.run(["readlink", "-f", disk["path"]]).stdout.strip() == device
    node.ctl("lun", "add", "t1", "bd")
    rescan(node)
    lun = node.device_for_serial(disk["serial"])
    assert size_of(node, lun) == 64 << 20
    guest.run(f"head -c 1M /dev/urandom > /tmp/bd.bin && dd if=/tmp/bd.bin of={lun} oflag=direct status=none")
    # The initiator's bytes are on the node's device itself.
    same = guest.run(f"dd if={device} bs=1M count=1 iflag=direct status=none | cmp - /tmp/bd.bin", check=False)
    assert same.rc == 0
    refused = node.ctl("disk", "extend", "bd", "128M", check=False)
    assert refused.rc == 7 and "grow the device" in refused.stderr
    twice = node.ctl("disk", "create-block", "again", disk["path"], check=False)
    assert twice.rc == 4


def test_block_device_in_use_on_the_node_is_refused(node):
    guest = node.guest
    device = guest.disk_device("busy")
    guest.run(f"mkfs.ext4 -q -F {device} && mkdir -p /tmp/busy && mount {device} /tmp/busy")
    refused = node.ctl("disk", "create-block", "busy", device, check=False)
    assert refused.rc == 6 and "mounted at /tmp/busy" in refused.stderr
    guest.run("umount /tmp/busy")
    node.ctl("disk", "create-block", "busy", device)
    not_block = node.ctl("disk", "create-block", "nb", "/etc/hostname", check=False)
    assert not_block.rc == 5 and "not a block device" in not_block.stderr
    # A disk now: LIO holds the device exclusively from then on, so the node cannot mount it.
    mounted = guest.run(f"mount {device} /tmp/busy", check=False)
    assert mounted.rc != 0 and "busy" in (mounted.stderr + mounted.stdout).lower()


def test_file_in_local_use_is_not_exported(node):
    guest = node.guest
    node.ctl("disk", "create", "looped", "16M")
    (disk,) = (d for d in node.ctl_json("disk", "list") if d["name"] == "looped")
    guest.run("modprobe loop")
    loop = guest.run(["losetup", "--find", "--show", disk["path"]]).stdout.strip()
    try:
        refused = node.ctl("lun", "add", "t1", "looped", check=False)
        assert refused.rc == 6 and f"attached to {loop}" in refused.stderr
    finally:
        guest.run(["losetup", "-d", loop])
    node.ctl("lun", "add", "t1", "looped")


def test_a_second_target_exports_a_disk_only_if_it_is_shared(node):
    node.ctl("target", "create", "t2")
    refused = node.ctl("lun", "add", "t2", "d1", check=False)
    assert refused.rc == 6 and "already exported by target 't1'" in refused.stderr
    node.ctl("disk", "modify", "d1", "--shared")
    node.ctl("lun", "add", "t2", "d1")
    luns = {(lun["target"], lun["disk"]) for lun in node.ctl_json("lun", "list")}
    assert {("t1", "d1"), ("t2", "d1")} <= luns
    refused = node.ctl("disk", "modify", "d1", "--exclusive", check=False)
    assert refused.rc == 6 and "t1, t2" in refused.stderr
    # Both targets really export the same backstore (one LIO storage object, two LUNs).
    links = node.guest.run("ls -l /sys/kernel/config/target/iscsi/*/tpgt_1/lun/*/ | grep -c '/d1$'").stdout
    assert int(links) == 2
