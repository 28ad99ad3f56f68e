"""Proves the VM harness: boot, command channel, LIO in the guest, private networks.

Two boots in all: ``node_a`` is shared by the module; the network test boots a
second guest on the same Lab bridges. If the machine cannot run VMs these tests
fail with the list of what is missing; they never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.vm.harness import (
    CommandError,
    CommandTimeout,
    Completed,
    Disk,
    Guest,
    HarnessError,
    Lab,
    Nic,
    find_kernel,
)

pytestmark = pytest.mark.vm

NODE_A_LAN = "10.99.0.1"
NODE_B_LAN = "10.99.0.2"
NODE_A_HB = "10.99.1.1"
NODE_B_HB = "10.99.1.2"


@pytest.fixture(scope="module")
def node_a(module_guest_factory, module_lab: Lab) -> Guest:
    return module_guest_factory(
        "node-a",
        lab=module_lab,
        nics=[Nic("lan", f"{NODE_A_LAN}/24"), Nic("hb", f"{NODE_A_HB}/24")],
        disks=[Disk("data0", "256M"), Disk("data1", "64M", bus="scsi")],
    )


def test_guest_boots_debian_kernel(node_a: Guest) -> None:
    release = node_a.run("uname -r").stdout.strip()
    assert f"vmlinuz-{release}" == find_kernel().name
    assert release.startswith("6.1."), release
    assert node_a.boot_seconds is not None and node_a.boot_seconds < 240
    # The console log is collected on the host while the guest runs.
    assert "Linux version 6.1" in node_a.console_output()
    print(f"boot: {node_a.boot_seconds:.1f}s")


def test_run_returns_output_and_exit_status(node_a: Guest) -> None:
    result = node_a.run("echo hello; echo oops >&2")
    assert (result.rc, result.stdout, result.stderr) == (0, "hello\n", "oops\n")

    failed = node_a.run("echo partial; exit 3", check=False)
    assert failed.rc == 3 and failed.stdout == "partial\n" and not failed.timed_out

    with pytest.raises(CommandError) as info:
        node_a.run("exit 7")
    assert info.value.result.rc == 7

    # argv form: no shell re-parsing of spaces and quotes.
    assert node_a.run(["printf", "%s|", "a b", "'c'"]).stdout == "a b|'c'|"
    assert node_a.run("tr a-z A-Z", input="stdin works").stdout == "STDIN WORKS"
    assert node_a.run("echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
    assert node_a.run("id -u").stdout.strip() == "0"


def test_run_timeout_kills_the_command(node_a: Guest) -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        # The background child proves the whole process group is killed.
        node_a.run("sleep 300 & echo started; wait", timeout=2)
    assert time.monotonic() - t0 < 20
    assert info.value.result.timed_out
    assert info.value.result.stdout == "started\n"

    result = node_a.run("sleep 300", timeout=1, check=False)
    assert result.timed_out and result.rc < 0
    # Nothing is left behind and the channel still answers.
    assert node_a.run("pgrep -x sleep", check=False).rc == 1


def test_channel_serves_requests_concurrently_and_fast(node_a: Guest) -> None:
    slow: list[Completed] = []
    worker = threading.Thread(target=lambda: slow.append(node_a.run("sleep 3; echo slow")))
    worker.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert node_a.run("echo quick").stdout == "quick\n"
    assert time.monotonic() - t0 < 2.5, "a short command waited for a long one"
    worker.join(timeout=60)
    assert slow and slow[0].stdout == "slow\n"

    pings = sorted(node_a.ping() for _ in range(20))
    t0 = time.monotonic()
    for _ in range(10):
        node_a.run("true")
    per_run = (time.monotonic() - t0) / 10
    print(f"channel round trip: median {pings[10] * 1000:.1f} ms; run('true'): {per_run * 1000:.0f} ms")
    assert pings[10] < 0.5

    big = node_a.run("head -c 2000000 /dev/zero | tr '\\0' x").stdout
    assert big == "x" * 2_000_000


def test_lio_is_available(node_a: Guest) -> None:
    node_a.setup_storage()
    node_a.setup_storage()  # idempotent: configfs already mounted
    assert "target_core_mod" in node_a.run("lsmod").stdout
    assert node_a.run("findmnt -n -o FSTYPE /sys/kernel/config").stdout.strip() == "configfs"
    assert node_a.run("cat /sys/kernel/config/target/version").stdout.startswith("Target Engine Core")


def test_state_dirs_are_writable_in_guest_only(node_a: Guest) -> None:
    node_a.setup_storage()
    marker = f"harness-{os.getpid()}"
    node_a.run(f"echo x > /var/lib/applianced/{marker} && echo y > /etc/target/{marker}")
    assert node_a.read_file(f"/var/lib/applianced/{marker}") == b"x\n"
    assert not Path(f"/var/lib/applianced/{marker}").exists()
    assert not Path(f"/etc/target/{marker}").exists()
    # Whether the checkout is read-only in the guest depends on where it lives (under /tmp
    # it is on an overlay); either way, what the guest writes there never reaches the host.
    stray = Path(__file__).parent / marker
    node_a.run(f"touch {stray}", check=False)
    assert not stray.exists()


def test_spawn_logs_to_host_and_kill(node_a: Guest) -> None:
    pid = node_a.spawn("ticker", "echo $GREETING; while :; do sleep 0.2; done", env={"GREETING": "hi"})
    assert pid > 1
    node_a.wait_until(f"kill -0 {pid}", timeout=10)
    assert node_a.status("ticker") is None
    deadline = time.monotonic() + 10
    while "hi" not in node_a.spawn_log("ticker") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node_a.spawn_log("ticker") == "hi\n"
    assert node_a.kill("ticker") == -15
    assert node_a.status("ticker") == -15


NOTIFY_READY = (
    "import os, socket, time; time.sleep(0.5);"
    " socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'STATUS=up\\nREADY=1', os.environ['NOTIFY_SOCKET']);"
    " time.sleep(60)"
)


def test_wait_notify_sees_the_process_own_ready_and_not_its_childs(node_a: Guest) -> None:
    node_a.spawn("notifier", [sys.executable, "-c", NOTIFY_READY], notify=True)
    node_a.wait_notify("notifier", timeout=30)
    node_a.kill("notifier")
    # A child's READY=1 does not count (systemd's NotifyAccess=main), nor does an exit.
    node_a.spawn("forwarder", ["/bin/sh", "-c", f'{sys.executable} -c "{NOTIFY_READY}"; exit 3'], notify=True)
    with pytest.raises(HarnessError, match="sent no READY=1 in 10s"):
        node_a.wait_notify("forwarder", timeout=10)
    node_a.kill("forwarder")
    node_a.spawn("quitter", ["/bin/sh", "-c", "exit 3"], notify=True)
    with pytest.raises(HarnessError, match="exited with status 3"):
        node_a.wait_notify("quitter", timeout=20)


def test_disks_are_backed_by_host_files(node_a: Guest) -> None:
    vd = node_a.disk_device("data0")
    sd = node_a.disk_device("data1")
    assert vd.startswith("/dev/vd") and sd.startswith("/dev/sd")
    assert node_a.run(["blockdev", "--getsize64", vd]).stdout.strip() == str(256 << 20)
    pattern = "applianced-harness-disk"
    node_a.run(f"printf {pattern} | dd of={sd} bs=512 seek=8 conv=sync,fsync oflag=direct status=none")
    with open(node_a.disk_image("data1"), "rb") as f:
        f.seek(8 * 512)
        assert f.read(len(pattern)).decode() == pattern


def test_dbus_and_iscsi_prerequisites(node_a: Guest, tmp_path: Path) -> None:
    """System bus with a given policy, iscsid, and a loopback iSCSI login through LIO."""
    policy = tmp_path / "org.applianced.HarnessTest.conf"
    policy.write_text(
        '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"\n'
        ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
        '<busconfig><policy user="root"><allow own="org.applianced.HarnessTest"/></policy></busconfig>\n'
    )
    node_a.setup_storage()
    node_a.start_dbus([policy])
    own = (
        "import asyncio, sys\n"
        "from dbus_fast import BusType\n"
        "from dbus_fast.aio import MessageBus\n"
        "async def main():\n"
        "    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
        "    print((await bus.request_name(sys.argv[1])).name)\n"
        "asyncio.run(main())\n"
    )
    python = str(node_a.python)
    assert node_a.run([python, "-c", own, "org.applianced.HarnessTest"]).stdout.strip() == "PRIMARY_OWNER"
    denied = node_a.run([python, "-c", own, "org.applianced.NotInPolicy"], check=False)
    assert denied.rc != 0 and "not allowed to own" in denied.stderr

    initiator = "iqn.2026-11.org.applianced:harness-client"
    target = "iqn.2026-11.org.applianced:harness-target"
    node_a.start_iscsid(initiator)
    assert node_a.run("cat /etc/iscsi/initiatorname.iscsi").stdout == f"InitiatorName={initiator}\n"
    make_target = (
        "import sys\n"
        "from rtslib_fb import FabricModule, FileIOStorageObject, LUN, MappedLUN, NetworkPortal, NodeACL, Target, TPG\n"
        "so = FileIOStorageObject('harness0', '/var/lib/applianced/harness0.img', size=16 << 20)\n"
        "tpg = TPG(Target(FabricModule('iscsi'), sys.argv[1]), 1)\n"
        "tpg.set_attribute('authentication', '0')\n"
        "NetworkPortal(tpg, '127.0.0.1', 3260)\n"
        "lun = LUN(tpg, 0, so)\n"
        "MappedLUN(NodeACL(tpg, sys.argv[2]), 0, lun)\n"
        "tpg.enable = True\n"
    )
    node_a.run([python, "-c", make_target, target, initiator])
    try:
        discovered = node_a.run("iscsiadm -m discovery -t sendtargets -p 127.0.0.1", timeout=60).stdout
        assert target in discovered
        node_a.run(f"iscsiadm -m node -T {target} -p 127.0.0.1 --login", timeout=60)
        link = f"/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{target}-lun-0"
        node_a.wait_until(f"test -b {link}", timeout=60)
        node_a.run(f"printf lio-ok | dd of={link} bs=512 conv=sync,fsync oflag=direct status=none")
        assert node_a.run("head -c 6 /var/lib/applianced/harness0.img").stdout == "lio-ok"
    finally:
        node_a.run(f"iscsiadm -m node -T {target} -p 127.0.0.1 --logout", check=False, timeout=60)
        node_a.run(
            [python, "-c", "from rtslib_fb import RTSRoot; RTSRoot().clear_existing(confirm=True)"],
            check=False,
        )
    assert node_a.kill("iscsid") is not None


def test_two_guests_talk_over_lab_bridges(node_a: Guest, guest_factory, module_lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "node-b-state"
    node_b = guest_factory(
        "node-b",
        lab=module_lab,
        nics=[Nic("lan", f"{NODE_B_LAN}/24"), Nic("hb", f"{NODE_B_HB}/24")],
        rwdirs={"/var/lib/applianced": state},
    )
    print(f"second boot: {node_b.boot_seconds:.1f}s")
    # A state directory shared from the host survives the guest (node reboots).
    node_b.setup_storage()
    node_b.run("echo kept > /var/lib/applianced/state.json")
    assert (state / "state.json").read_text() == "kept\n"

    # busybox ping: busybox-static is required anyway, iputils-ping may be absent.
    for src, dst in ((node_a, NODE_B_LAN), (node_b, NODE_A_LAN), (node_a, NODE_B_HB), (node_b, NODE_A_HB)):
        result = src.run(f"busybox ping -c 3 -W 2 -i 0.3 {dst}", timeout=30, check=False)
        assert result.rc == 0, result.describe()
        assert "3 packets received" in result.stdout
    # Each NIC sits on the bridge it was asked for: the peer's address on each
    # subnet resolved to the MAC of the peer's NIC on that bridge.
    assert node_a.macs[0] in node_b.run(f"ip neigh show {NODE_A_LAN}").stdout
    assert node_a.macs[1] in node_b.run(f"ip neigh show {NODE_A_HB}").stdout
    for bridge in ("lan", "hb"):
        ports = module_lab.run(["ip", "-br", "link", "show", "master", bridge]).stdout
        assert len(ports.splitlines()) == 2, ports

    node_b.stop()
    assert not node_b.running
    assert (node_b.log_dir / "dmesg.log").read_text().startswith("[")
    assert "reboot: Power down" in node_b.console_output()
    # Its taps are gone from the lab; node-a's two remain.
    links = module_lab.run(["ip", "-br", "link", "show", "type", "tun"]).stdout
    assert len(links.splitlines()) == 2, links


def test_lab_namespace_lifecycle() -> None:
    """The Lab alone (no guest): bridges live in a namespace that close() removes."""
    with Lab(bridges=("lan", "hb")) as lab:
        links = lab.run(["ip", "-br", "link", "show", "type", "bridge"]).stdout
        assert {line.split()[0] for line in links.splitlines()} == {"lan", "hb"}
        lab.add_address("lan", "10.99.9.1/24")
        assert "10.99.9.1/24" in lab.run(["ip", "-br", "addr", "show", "lan"]).stdout
        # Nothing leaks onto the host's own interfaces.
        host = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True).stdout
        assert "10.99." not in host
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert lab.ns not in names
