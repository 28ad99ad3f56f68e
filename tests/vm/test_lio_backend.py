"""The LIO backend on a real kernel: what it builds through configfs, read back by rtslib
and carried through targetcli's save and restore; its plain configfs reads against
rtslib's view; and plans interrupted at every step (and inside a step) converging when run
again.

Each check runs as one Python program in the guest (the venv's, as the daemon runs), which
prints what it found; the assertions are made here.
"""

import json

import pytest

from tests.vm.appliance import VENV_BIN, ApplianceNode
from tests.vm.harness import Disk

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:backend-client"

# What every program starts with: a desired configuration with one of each kind of object
# and setting, the backend, and rtslib's own view of the same objects (what observe used
# to read, property by property), to compare with.
COMMON = r"""
import json, sys
import rtslib_fb
from rtslib_fb.utils import RTSLibNotInCFSError
from applianced.iscsi.kernel.lio import LioKernel
from applianced.iscsi.kernel.model import (DIGEST_OFFERS, NEGOTIATION_PROFILE, TPG_ATTRIBUTES, TPG_PARAMETERS,
    DiskDevice, KernelConfig, KernelTarget, MappedLun, NodeAcl, StorageObject)
from applianced.iscsi.kernel.disk_devices import DiskDevices
from applianced.iscsi.kernel.plan import RemoveDiskDevice
from applianced.iscsi.kernel.plan import plan
from applianced.state import Chap

block, initiator = sys.argv[1], sys.argv[2]
T1, T2, T3 = (f"iqn.2026-11.org.applianced.test:backend-{n}" for n in ("t1", "t2", "t3"))
OTHER = "iqn.2026-11.org.applianced.test:other"
for name in ("f1", "f2", "f3", "d1"):
    open(f"/var/lib/applianced/{name}.img", "w").truncate(16 << 20)

def target(iqn, enabled=True, alias="t", digest="allowed", portals=(("127.0.0.1", 3260),), luns=None, acls=()):
    return KernelTarget(
        iqn=iqn, enabled=enabled, attributes=dict(TPG_ATTRIBUTES),
        parameters={"TargetAlias": alias, "HeaderDigest": DIGEST_OFFERS[digest], "DataDigest": DIGEST_OFFERS[digest],
                    **NEGOTIATION_PROFILE},
        portals=frozenset(portals), luns=luns or {}, acls={acl.initiator: acl for acl in acls})

DESIRED = KernelConfig(
    storage_objects={
        "f1": StorageObject("f1", "/var/lib/applianced/f1.img", 16 << 20, "8c1b7e4e-0f3a-4d1e-9a51-5a0c2f1d0001"),
        "f2": StorageObject("f2", "/var/lib/applianced/f2.img", 16 << 20, "8c1b7e4e-0f3a-4d1e-9a51-5a0c2f1d0002",
                            write_back=True),
        "f3": StorageObject("f3", "/var/lib/applianced/f3.img", 16 << 20, "8c1b7e4e-0f3a-4d1e-9a51-5a0c2f1d0003"),
        "b1": StorageObject("b1", block, 0, "8c1b7e4e-0f3a-4d1e-9a51-5a0c2f1d0004", plugin="block"),
        # A disk on its own device-mapper device, over its file's loop device.
        "d1": StorageObject("d1", "/run/applianced/block/applianced-disk-d1", 0, "8c1b7e4e-0f3a-4d1e-9a51-5a0c2f1d0005",
                            plugin="block"),
    },
    targets={
        T1: target(T1, alias="first target", digest="required",
                   portals=(("127.0.0.1", 3260), ("::1", 3261)), luns={0: "f1", 3: "b1"},
                   acls=(NodeAcl(OTHER, frozenset({MappedLun(0, 0), MappedLun(3, 3, True)}),
                                 Chap("other", "secret-0123456", T1, "mutual-0123456")),
                         NodeAcl(initiator, frozenset({MappedLun(0, 0)}), Chap(initiator, "secret-6543210")))),
        T2: target(T2, enabled=False, digest="off", luns={0: "f2"},
                   acls=(NodeAcl(OTHER, frozenset({MappedLun(0, 0, True)})),)),
        T3: target(T3, luns={1: "f3", 2: "d1"},
                   acls=(NodeAcl(initiator, frozenset({MappedLun(1, 1), MappedLun(2, 2)})),)),
    },
    discovery_auth=Chap("disco", "disco-secret-1", "disco-target", "disco-mutual-1"),
    disk_devices={"d1": DiskDevice("applianced-disk-d1", "/var/lib/applianced/d1.img", True, 12 << 20)},
)
NAMES, IQNS = sorted(DESIRED.storage_objects), sorted(DESIRED.targets)

def unbracket(address):
    return address[1:-1] if address.startswith("[") else address

def rtslib_view():
    fabric = rtslib_fb.FabricModule("iscsi")
    objects = {}
    for name in NAMES:
        for cls in (rtslib_fb.FileIOStorageObject, rtslib_fb.BlockStorageObject):
            try:
                so = cls(name)
            except RTSLibNotInCFSError:
                continue
            if cls is rtslib_fb.BlockStorageObject:
                objects[name] = StorageObject(so.name, so.udev_path, 0, so.wwn, plugin="block")
            else:
                objects[name] = StorageObject(so.name, so.udev_path, so.size, so.wwn, so.write_back)
            break
    targets = {}
    for iqn in IQNS:
        try:
            tpg = rtslib_fb.TPG(rtslib_fb.Target(fabric, iqn, mode="lookup"), 1, mode="lookup")
        except RTSLibNotInCFSError:
            continue
        acls = {}
        for acl in tpg.node_acls:
            mapped = frozenset(MappedLun(m.mapped_lun, m.tpg_lun.lun, bool(m.write_protect)) for m in acl.mapped_luns)
            auth = None
            if acl.get_attribute("authentication") == "1":
                auth = Chap(acl.chap_userid, acl.chap_password, acl.chap_mutual_userid, acl.chap_mutual_password)
            acls[acl.node_wwn] = NodeAcl(acl.node_wwn, mapped, auth)
        targets[iqn] = KernelTarget(
            iqn=iqn, enabled=bool(tpg.enable),
            attributes={name: tpg.get_attribute(name) for name in TPG_ATTRIBUTES},
            parameters={name: tpg.get_parameter(name) for name in TPG_PARAMETERS},
            portals=frozenset((unbracket(np.ip_address), int(np.port)) for np in tpg.network_portals),
            luns={lun.lun: lun.storage_object.name for lun in tpg.luns}, acls=acls)
    discovery = None
    if fabric.discovery_enable_auth:
        discovery = Chap(fabric.discovery_userid, fabric.discovery_password, fabric.discovery_mutual_userid,
                         fabric.discovery_mutual_password)
    return KernelConfig(objects, targets, discovery)

kernel = LioKernel()
kernel.open()

def observe():
    return kernel.observe(NAMES, IQNS, DESIRED.disk_devices)

def clear():
    # LIO and the disk devices gone, as after a reboot.
    rtslib_fb.RTSRoot().clear_existing(confirm=True)
    DiskDevices().apply(RemoveDiskDevice("applianced-disk-d1"))

def without_devices(config):
    # rtslib sees no device-mapper devices: compare the rest.
    return KernelConfig(config.storage_objects, config.targets, config.discovery_auth)
"""

READS = (
    COMMON
    + r"""
import subprocess
clear()
# A backstore of another tool's, made first: applianced's must take other HBA indexes.
open("/var/lib/applianced/foreign.img", "w").truncate(16 << 20)
foreign = rtslib_fb.FileIOStorageObject("foreign", "/var/lib/applianced/foreign.img", 16 << 20)
kernel.apply(plan(observe(), DESIRED))
built = observe()
# rtslib and targetctl (targetcli's save and restore) handle what applianced built.
subprocess.run(["targetctl", "save", "/tmp/built.json"], check=True)
subprocess.run(["targetctl", "clear"], check=True)
subprocess.run(["targetctl", "restore", "/tmp/built.json"], check=True)
saved = json.load(open("/tmp/built.json"))
restored = observe()
rtslib_fb.tcm.bs_cache.clear()  # rtslib's index of backstore names, stale after targetctl's changes
# LUN 7 of T3, made by another tool, and not mapped; settings that differ from applianced's.
tpg = rtslib_fb.TPG(rtslib_fb.Target(rtslib_fb.FabricModule("iscsi"), T3, mode="lookup"), 1, mode="lookup")
rtslib_fb.LUN(tpg, 7, rtslib_fb.FileIOStorageObject("f1"))
tpg.set_attribute("demo_mode_discovery", "1")
tpg.set_parameter("MaxBurstLength", "1048576")
mine, theirs = observe(), rtslib_view()
print(json.dumps({"built_as_wanted": built == DESIRED, "restored_as_built": restored == built,
                  "foreign_kept": rtslib_fb.FileIOStorageObject("foreign").udev_path.endswith("foreign.img"),
                  "saved_objects": sorted(so["name"] for so in saved["storage_objects"]),
                  "same": without_devices(mine) == theirs, "mine": repr(mine), "theirs": repr(theirs),
                  "t3_luns": mine.targets[T3].luns, "t1_as_wanted": mine.targets[T1] == DESIRED.targets[T1],
                  "objects_as_wanted": mine.storage_objects == DESIRED.storage_objects,
                  "discovery_as_wanted": mine.discovery_auth == DESIRED.discovery_auth}))
"""
)

CONVERGE = (
    COMMON
    + r"""
import glob, os, subprocess
from pathlib import Path
CORE = "/sys/kernel/config/target/core"
TPG1 = f"/sys/kernel/config/target/iscsi/{T1}/tpgt_1"
failures = []

def converge(label):
    actions = plan(observe(), DESIRED)
    kernel.apply(actions)
    if observe() != DESIRED or plan(observe(), DESIRED):
        failures.append(f"{label}: not converged")
    copies = {name: len(glob.glob(f"{CORE}/*/{name}")) for name in NAMES}
    if set(copies.values()) != {1}:
        failures.append(f"{label}: backstores {copies}")
    loops = subprocess.run(["losetup", "-j", "/var/lib/applianced/d1.img"], capture_output=True, text=True).stdout
    if len(loops.splitlines()) != 1:
        failures.append(f"{label}: loop devices of d1: {loops!r}")

# A crash after each action of a restore from empty.
steps = plan(KernelConfig(), DESIRED)
for done in range(len(steps) + 1):
    clear()
    kernel.apply(steps[:done])
    # The same actions again, as after a crash whose state file still held the new config.
    kernel.apply(steps[:done])
    converge(f"after {done} of {len(steps)} actions")

# A crash inside an action: its directory made, the rest not.
half_made = {
    # After the other backstores, so that the half-made one is not the only one.
    "backstore without its configuration": lambda: (
        kernel.apply([a for a in steps if type(a).__name__ == "CreateDiskDevice"
                      or type(a).__name__ == "CreateStorageObject" and a.storage_object.name != "f1"]),
        os.makedirs(f"{CORE}/fileio_77/f1"),
    ),
    "target without its TPG": lambda: os.makedirs(f"/sys/kernel/config/target/iscsi/{T1}"),
    "LUN without its link": lambda: os.makedirs(f"{TPG1}/lun/lun_0"),
    "disk device without its table": lambda: subprocess.run(
        ["dmsetup", "create", "applianced-disk-d1", "--notable"], check=True),
    "mapped LUN without its link": lambda: os.makedirs(f"{TPG1}/acls/{OTHER}/lun_0"),
}
for label, make in half_made.items():
    clear()
    if label.startswith("LUN") or label.startswith("mapped"):
        kernel.apply([a for a in steps if type(a).__name__ in ("CreateTarget", "AddAcl")])
    make()
    converge(label)

# Another process clears LIO behind this one's back (rtslib remembers the backstores).
subprocess.run(["targetctl", "clear"], check=True)
converge("after targetctl clear in another process")
print(json.dumps({"steps": len(steps), "failures": failures}))
"""
)


MISSING_FILE = (
    COMMON
    + r"""
import os
from applianced.errors import KernelError
clear()
os.rename("/var/lib/applianced/f3.img", "/var/lib/applianced/f3.moved")
try:
    kernel.apply(plan(observe(), DESIRED))
    error = ""
except KernelError as exc:
    error = str(exc)
created = os.path.exists("/var/lib/applianced/f3.img")
os.rename("/var/lib/applianced/f3.moved", "/var/lib/applianced/f3.img")
kernel.apply(plan(observe(), DESIRED))
print(json.dumps({"error": error, "created": created, "converged": observe() == DESIRED}))
"""
)


@pytest.fixture(scope="module")
def node(module_guest_factory):
    guest = module_guest_factory("backend", disks=[Disk("blk", "16M")])
    appliance = ApplianceNode(guest).prepare()
    guest.run("ip link set lo up")
    for name, text in (("reads", READS), ("converge", CONVERGE), ("missing", MISSING_FILE)):
        guest.write_file(f"/tmp/{name}.py", text, mode=0o644)
    return appliance


def program(node, name, *args):
    device = node.guest.disk_device("blk")
    result = node.guest.run([str(VENV_BIN / "python"), f"/tmp/{name}.py", device, INITIATOR, *args], timeout=1200)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reads(node):
    return program(node, "reads")


def test_what_configfs_builds_is_lios_and_targetclis(reads):
    found = reads
    assert found["built_as_wanted"]
    assert found["saved_objects"] == ["b1", "d1", "f1", "f2", "f3", "foreign"]
    assert found["restored_as_built"]
    assert found["foreign_kept"]


def test_configfs_reads_equal_rtslib_properties(reads):
    found = reads
    assert found["same"], f"configfs: {found['mine']}\nrtslib: {found['theirs']}"
    assert found["t3_luns"] == {"1": "f3", "2": "d1", "7": "f1"}
    assert found["t1_as_wanted"] and found["objects_as_wanted"] and found["discovery_as_wanted"]


def test_interrupted_plans_converge(node):
    found = program(node, "converge")
    assert found["steps"] > 20
    assert found["failures"] == []


def test_a_missing_disk_file_is_refused_not_created_empty(node):
    found = program(node, "missing")
    assert "the disk file /var/lib/applianced/f3.img is missing" in found["error"]
    assert not found["created"], "LIO must never be handed a path it would create empty"
    assert found["converged"], "once the file is back, the same plan completes"
