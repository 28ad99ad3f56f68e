"""Two storage nodes and a client on the lab's bridges, shared by the replication and
failover modules of the VM tier (each boots a cluster of its own).

``lan`` carries iSCSI (and the peer link's auxiliary path), ``hb`` the replication traffic
and the link's main path. Each node keeps its disk and its state directory on the host, so
that it can crash (its QEMU killed) and boot again with what it had. ``paired_cluster``
pairs the nodes and has node a serve its disk d1 as target t1; node b's disk c1 is the
copy-to-be.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from applianced.constants import PEER_INTERFACE, PEER_PATH
from tests.vm.appliance import UDEV_RULES, ApplianceNode
from tests.vm.harness import Disk, Guest, Nic

MIB = 1 << 20
REGION = 64 * 1024
VOLUME = 64 * MIB
LAN = {"a": "10.60.0.1", "b": "10.60.0.2", "client": "10.60.0.10"}
HB = {"a": "10.61.0.1", "b": "10.61.0.2"}
MACS = {"a": ("52:54:00:60:00:01", "52:54:00:61:00:01"), "b": ("52:54:00:60:00:02", "52:54:00:61:00:02")}
INITIATOR = "iqn.2026-11.org.applianced.test:replication-client"
TARGET = "iqn.2003-01.org.linux-iscsi.applianced:t1"
STATE_DIR = "/var/lib/applianced"
KEY = "3f" * 32


class Node(ApplianceNode):
    """A storage node: its disk ``vol`` (kept on the host), paired with the other."""

    @property
    def vol(self) -> str:
        return self.guest.disk_device("vol")

    def state(self, disk: str = "d1") -> int:
        return int(self.ctl("mirror", "state", disk).stdout)

    def mirror(self, disk: str = "d1") -> dict:
        return json.loads(self.ctl("--json", "mirror", "show", disk).stdout)

    def wait_state(self, wanted: int, disk: str = "d1", timeout: float = 180) -> float:
        start = time.monotonic()
        while (state := self.state(disk)) != wanted:
            assert time.monotonic() - start < timeout, f"{self.guest.name}: {disk} is {state}, not {wanted}"
            time.sleep(1)
        return time.monotonic() - start

    def checksum(self, path: str, size: int = VOLUME) -> str:
        """The MD5 of the first ``size`` bytes of a block device (read past the page cache)
        or of a file (through it: tmpfs has no O_DIRECT, and its loop device shares the cache)."""
        direct = "iflag=direct" if path.startswith("/dev/") else ""
        command = f"set -o pipefail; dd if={path} bs=1M count={size // MIB} {direct} status=none | md5sum"
        return self.guest.run(["bash", "-c", command], timeout=180).stdout.split()[0]

    def stuck_tasks(self) -> list[str]:
        """Tasks in uninterruptible sleep in two looks a second apart: I/O that hangs."""
        looks = self.guest.run("for i in 1 2; do ps -eo pid=,stat=,comm= | awk '$2 ~ /^D/'; echo; sleep 1; done")
        first, second = (set(look.splitlines()) for look in looks.stdout.split("\n\n")[:2])
        return sorted(first & second)


class Cluster:
    """Two nodes and a client; the nodes' disks and state directories live on the host."""

    def __init__(self, factory, lab, keep: Path) -> None:
        self.factory, self.lab, self.keep = factory, lab, keep
        self.boots = 0
        client = factory(
            "repl-client", start=False, lab=lab, nics=[Nic("lan", f"{LAN['client']}/24", mac="52:54:00:60:00:10")]
        )
        guests = [self._guest("a"), self._guest("b")]
        factory.start_all(*guests, client)
        self.a, self.b = (self._node(guest) for guest in guests)
        self.client = Node(client)
        rule = UDEV_RULES[0]  # the initiator's stable names of LUNs
        client.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        client.run("udevadm control --reload || true")
        client.start_iscsid(INITIATOR)

    def _guest(self, name: str) -> Guest:
        self.boots += 1
        state = self.keep / f"{name}-state"
        state.mkdir(exist_ok=True)
        return self.factory(
            f"repl-{name}-{self.boots}",
            start=False,
            lab=self.lab,
            memory="1280M",
            disks=[Disk("vol", VOLUME, path=self.keep / f"{name}.img")],
            # The same MACs after a reboot, so that the peer's ARP entries stay right.
            nics=[Nic("lan", f"{LAN[name]}/24", mac=MACS[name][0]), Nic("hb", f"{HB[name]}/24", mac=MACS[name][1])],
            rwdirs={STATE_DIR: state},
        )

    def _node(self, guest: Guest) -> Node:
        node = Node(guest).prepare()
        node.start()
        return node

    def crash_and_boot(self, name: str) -> Node:
        """Kill the node's QEMU (a power cut: no sync) and boot it again with its disk and state."""
        getattr(self, name).guest.power_off()
        guest = self._guest(name)
        self.factory.start_all(guest)
        node = self._node(guest)
        setattr(self, name, node)
        return node

    def client_device(self, serial: str) -> str:
        return self.client.device_for_serial(serial)

    def client_write(self, device: str, regions: list[int]) -> list[str]:
        """Write one random region at each index through iSCSI; the errors (none expected)."""
        script = "; ".join(
            f"dd if=/dev/urandom of={device} bs={REGION} seek={region} count=1 oflag=direct status=none "
            f"|| echo failed {region}"
            for region in regions
        )
        return [line for line in self.client.guest.run(script, timeout=600).stdout.splitlines() if line]


def paired_cluster(factory, lab, keep: Path) -> Cluster:
    """A cluster whose nodes are paired; node a serves d1 (its virtio disk) as t1 on its
    LAN address to the client's initiator, and node b has the copy-to-be, c1."""
    cluster = Cluster(factory, lab, keep)
    for node, peer in ((cluster.a, "b"), (cluster.b, "a")):
        node.guest.write_file("/tmp/pair.key", KEY)
        node.ctl("pair", "create", HB[peer], "--aux-address", LAN[peer], "--key-file", "/tmp/pair.key")
    cluster.a.wait_property(PEER_PATH, PEER_INTERFACE, "Connected", "b true")
    cluster.a.ctl_batch(
        ("disk", "create-block", "d1", "/dev/disk/by-id/virtio-vol"),
        ("target", "create", "t1"),
        ("portal", "create", LAN["a"]),
        ("lun", "add", "t1", "d1"),
        ("acl", "add", "t1", INITIATOR),
    )
    cluster.b.ctl_batch(("disk", "create-block", "c1", "/dev/disk/by-id/virtio-vol"))
    return cluster


def serial_of(node: Node, disk: str) -> str:
    return next(d["serial"] for d in node.ctl_json("disk", "list") if d["name"] == disk)


def vpd(cluster: Cluster, device: str) -> tuple[str, str]:
    """The unit serial (VPD 0x80) and device identification (0x83) pages as the client reads them."""
    run = cluster.client.guest.run
    return run(["sg_inq", "-p", "0x80", "-H", device]).stdout, run(["sg_inq", "-p", "0x83", "-H", device]).stdout


def assert_equal_copies(cluster: Cluster, source: Node, target: Node) -> None:
    assert source.checksum(source.vol) == target.checksum(target.vol)
