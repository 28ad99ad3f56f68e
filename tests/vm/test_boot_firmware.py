"""iSCSI boot with real firmware: iPXE and UEFI PCs boot from applianced LUNs.

A storage node guest and diskless QEMU PCs on the lab's LAN: one with SeaBIOS and the
stock iPXE ROM of Debian's ipxe-qemu (``-boot n``), one with Debian's OVMF and its iSCSI
driver. dnsmasq in the lab's namespace serves exactly what ``appliancectl boot show NAME
--format dnsmasq`` printed, plus the interface and range lines any site adds. The LUN
holds what prints a random marker on the PC's serial port (a boot sector for iPXE, a
startup.nsh that OVMF's shell runs from the LUN for UEFI): the marker shows that the
firmware found the LUN, logged in and booted from it, and the node shows the profile's
initiator IQN logged in. iPXE takes CHAP from the root-only snippet; UEFI from its setup.
"""

import secrets
import time

import pytest

from applianced.state import Chap
from tests.vm.appliance import VENV_BIN, ApplianceNode
from tests.vm.harness import HarnessError, Nic
from tests.vm.netboot import Dnsmasq, NetbootPc, boot_sector, fat_image, seed_uefi_attempt

pytestmark = pytest.mark.vm

NODE = "10.99.0.5"
DHCP_SERVER = "10.99.0.1/24"
DHCP_RANGE = "10.99.0.100,10.99.0.150,255.255.255.0"
PC_MAC = "52:54:00:99:00:42"
INITIATOR = "iqn.2026-11.org.applianced.test:pc1"
UEFI_MAC = "52:54:00:99:00:43"
UEFI_INITIATOR = "iqn.2026-11.org.applianced.test:uefi-pc"
# Characters a DHCP server's configuration must quote or escape: the secret arrives intact
# only if the printed snippet did that right.
SECRET, MUTUAL = 'b0ot"s#3,cr\\t', "mutual-s3cret!"
UEFI_SECRET = "uefi-s3cret-1"
# SeaBIOS, iPXE's DHCP, the iSCSI login and the boot under TCG take about half a minute.
BOOT_TIMEOUT = 240


@pytest.fixture(scope="module")
def node(module_guest_factory, module_lab):
    guest = module_guest_factory("node", lab=module_lab, nics=[Nic("lan", f"{NODE}/24")])
    appliance = ApplianceNode(guest).prepare()
    appliance.start()
    appliance.serve("8M", INITIATOR, NODE)
    # Only what a new user types: the profile of the PC, bound to its MAC.
    appliance.ctl("boot", "create", "pc1", "t1", INITIATOR, "--mac", PC_MAC)
    # The DHCP server's address, on the lab's bridge inside the lab's namespace.
    module_lab.add_address("lan", DHCP_SERVER)
    return appliance


def write_disk(node, name, data):
    """Put ``data`` at the start of disk ``name``, as an installer would."""
    (path,) = [disk["path"] for disk in node.ctl_json("disk", "list") if disk["name"] == name]
    node.guest.write_file("/tmp/disk-start", data)
    node.guest.run(["dd", "if=/tmp/disk-start", f"of={path}", "conv=notrunc,fsync", "status=none"])


def netboot(node, lab, snippet, pc, marker, target):
    """Boot ``pc`` with dnsmasq serving ``snippet``; ``target``'s sessions while it runs."""
    with Dnsmasq(lab, "lan", DHCP_RANGE, snippet, pc.log_dir), pc:
        try:
            seconds = pc.wait_for(marker, BOOT_TIMEOUT)
        except HarnessError as exc:
            seen = node.ctl("initiator", "seen").stdout
            pytest.fail(f"{exc}\ninitiator seen:\n{seen}", pytrace=False)
        print(f"the PC booted from the LUN in {seconds:.0f} s")
        # The PC waits in its boot code, its session still open.
        return node.ctl_json("target", "sessions", target)


def ipxe_boot(node, lab, log_dir, snippet):
    marker = f"APPLIANCED-ISCSI-BOOT-{secrets.token_hex(6)}"
    write_disk(node, "d1", boot_sector(marker))
    return netboot(node, lab, snippet, NetbootPc(lab, "lan", PC_MAC, log_dir), marker, "t1")


def wait_for_login(node, timeout=60):
    """The node's row for the PC's login (the sampler runs every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = node.ctl_json("initiator", "seen")
        row = next((r for r in rows if r["initiator"] == INITIATOR and r["outcome"] == "logged in"), None)
        if row:
            return row
        assert time.monotonic() < deadline, f"no login of {INITIATOR} seen: {rows}"
        time.sleep(1)


def test_ipxe_boots_from_the_printed_snippet(node, module_lab, module_guest_factory):
    snippet = node.ctl("boot", "show", "pc1", "--format", "dnsmasq").stdout
    sessions = ipxe_boot(node, module_lab, module_guest_factory.log_dir / "pc-plain", snippet)
    assert [(s["initiator"], s["luns"], s["authentication"]) for s in sessions] == [(INITIATOR, "0", "none")]
    row = wait_for_login(node)
    assert row["target"] == "t1" and row["address"].startswith("10.99.0.1")


def test_ipxe_boots_with_mutual_chap_from_the_root_only_snippet(node, module_lab, module_guest_factory):
    node.guest.run(
        [str(VENV_BIN / "appliancectl"), "chap", "acl", "t1", INITIATOR, "--mutual"], input=f"{SECRET}\n{MUTUAL}\n"
    )
    public = node.ctl("boot", "show", "pc1", "--format", "dnsmasq").stdout
    assert SECRET not in public and MUTUAL not in public and "--secrets" in public
    snippet = node.ctl("boot", "show", "pc1", "--format", "dnsmasq", "--secrets").stdout
    assert "encap:175,191," in snippet and "encap:175,193," in snippet
    sessions = ipxe_boot(node, module_lab, module_guest_factory.log_dir / "pc-chap", snippet)
    assert [(s["initiator"], s["luns"], s["authentication"]) for s in sessions] == [(INITIATOR, "0", "mutual-chap")]
    assert SECRET not in node.log()


def test_uefi_boots_with_mutual_chap_typed_in_its_setup(node, module_lab, module_guest_factory):
    node.ctl_batch(
        ("disk", "create", "d2", "2M"),
        ("target", "create", "t2"),
        ("lun", "add", "t2", "d2"),
        ("acl", "add", "t2", UEFI_INITIATOR),
        ("boot", "create", "pc2", "t2", UEFI_INITIATOR, "--mac", UEFI_MAC, "--firmware", "uefi"),
    )
    node.guest.run(
        [str(VENV_BIN / "appliancectl"), "chap", "acl", "t2", UEFI_INITIATOR, "--mutual"],
        input=f"{UEFI_SECRET}\n{MUTUAL}\n",
    )
    # UEFI takes no credentials from DHCP: the snippet every user may print is complete.
    snippet = node.ctl("boot", "show", "pc2", "--format", "dnsmasq").stdout
    assert "--secrets" not in snippet and ",17," in snippet and ",203," not in snippet
    log_dir = module_guest_factory.log_dir / "pc-uefi"
    # What the administrator types in the firmware's iSCSI setup; DHCP gives the rest.
    t2_iqn = next(t["iqn"] for t in node.ctl_json("target", "list") if t["name"] == "t2")
    uefi_vars = log_dir / "OVMF_VARS.fd"
    chap = Chap(UEFI_INITIATOR, UEFI_SECRET, t2_iqn, MUTUAL)
    seed_uefi_attempt(uefi_vars, UEFI_MAC, UEFI_INITIATOR, chap, log_dir)
    marker = f"APPLIANCED-UEFI-BOOT-{secrets.token_hex(6)}"
    write_disk(node, "d2", fat_image({"startup.nsh": f"echo {marker}\r\n"}))
    pc = NetbootPc(module_lab, "lan", UEFI_MAC, log_dir, uefi_vars=uefi_vars)
    sessions = netboot(node, module_lab, snippet, pc, marker, "t2")
    assert [(s["initiator"], s["luns"], s["authentication"]) for s in sessions] == [
        (UEFI_INITIATOR, "0", "mutual-chap")
    ]
