"""The demo: the highly available pair, built and used the way an administrator would.

Two storage nodes and a client in QEMU guests on two private networks (bridges inside a
network namespace made for the demo): the data LAN, which also holds the ping node (an
address of the namespace itself), and the nodes' replication and heartbeat link. node1
serves a disk; the client logs in and checks what it wrote; node1's daemon restarts under
the client. The nodes pair, node1's disk is mirrored to node2 while in use, and node2's
replication cable is pulled during writes and plugged back (a partial resync).

Then failover: a virtual IP, the ping node, the target protected. The client writes
numbered blocks through the virtual IP and node1 is killed (its QEMU, a power cut): node2
takes over; the demo prints the stall the client saw, that no write failed and that every
acknowledged block reads back. node1 boots again as the passive node, takes a partial
resync from node2, and the service is failed back by hand while the client writes.
Everything is torn down at the end; nothing leaves the demo's own namespace.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from applianced.bus.paths import mirror_path
from applianced.constants import FAILOVER_INTERFACE, FAILOVER_PATH, MIRROR_INTERFACE, PEER_INTERFACE, PEER_PATH
from tests.vm.appliance import FAILOVER_INITIATOR, ApplianceNode
from tests.vm.harness import Disk, Guest, Lab, Nic, check_platform, start_all
from tests.vm.sequenced_writes import BLOCK, Written, write_through

MIB = 1 << 20
VOLUME = 128 * MIB
CLIENT_IQN = "iqn.2026-11.org.applianced.demo:client"
TARGET = "iqn.2026-11.org.applianced.demo:storage"
LAN = {"node1": "10.99.0.11", "node2": "10.99.0.12"}
LINK = {"node1": "10.98.0.11", "node2": "10.98.0.12"}
# The same MACs after a reboot, so that the peer's and the client's ARP entries stay right.
MACS = {"node1": ("52:54:00:99:00:11", "52:54:00:98:00:11"), "node2": ("52:54:00:99:00:12", "52:54:00:98:00:12")}
CLIENT_ADDRESS = "10.99.0.21"
PING_NODE = "10.99.0.254"
VIP = "10.99.0.100"
VIP_PORT = "3261"  # the wildcard portal's; node1's own 10.99.0.11:3260 stays as it is
# The client writes the volume's second half during a failover.
FAILOVER_BLOCKS = range(VOLUME // 2 // BLOCK, VOLUME // BLOCK)


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(node: str, result_text: str) -> None:
    for line in result_text.rstrip().splitlines():
        print(f"    [{node}] {line}")


class StorageNode(ApplianceNode):
    def __init__(self, name: str, guest: Guest) -> None:
        super().__init__(guest)
        self.name = name

    def admin(self, *args: str) -> str:
        """appliancectl as the administrator types it, shown."""
        print(f"    [{self.name}] # appliancectl {' '.join(args)}")
        return self.ctl(*args).stdout

    def failover(self) -> dict:
        return json.loads(self.ctl("--json", "failover", "status").stdout)

    def wait_failover(self, name: str, value: str, timeout: float = 240) -> None:
        self.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, name, value, timeout=timeout)

    def disk_checksum(self) -> str:
        device = self.guest.disk_device("vol")
        return self.guest.run(f"dd if={device} bs=1M iflag=direct status=none | md5sum", timeout=300).stdout.split()[0]


# Each node's data LAN address and MAC, then its link's.
NODE_NICS = {name: ((LAN[name], MACS[name][0]), (LINK[name], MACS[name][1])) for name in LAN}


class Pair:
    """The two storage nodes, each bootable again with its disk, its state and its MACs:
    ``nics`` has each node's data LAN and link addresses with their MACs, ``disk`` the name
    and size of its disk."""

    def __init__(
        self,
        lab: Lab,
        logs: Path,
        nics: dict[str, tuple[tuple[str, str], ...]] = NODE_NICS,
        disk: tuple[str, int] = ("vol", VOLUME),
    ) -> None:
        self.lab, self.logs, self.nics, self.disk = lab, logs, nics, disk
        self._boots: dict[str, int] = {}
        self.guests: list[Guest] = []

    def guest(self, name: str) -> Guest:
        boot = self._boots[name] = self._boots.get(name, 0) + 1
        state = self.logs / f"{name}-state"
        state.mkdir(exist_ok=True)
        hostname = name if boot == 1 else f"{name}-boot{boot}"
        (lan, lan_mac), (link, link_mac) = self.nics[name]
        disk, size = self.disk
        guest = Guest(
            hostname,
            self.logs / hostname,
            lab=self.lab,
            memory="1280M",
            disks=[Disk(disk, size, path=self.logs / f"{name}-{disk}.img")],
            nics=[Nic("lan", f"{lan}/24", mac=lan_mac), Nic("hb", f"{link}/24", mac=link_mac)],
            rwdirs={"/var/lib/applianced": state},
        )
        self.guests.append(guest)
        return guest

    def node(self, name: str, guest: Guest) -> StorageNode:
        node = StorageNode(name, guest)
        node.prepare()
        node.start()
        return node

    def boot_again(self, name: str) -> StorageNode:
        """The node's machine started again after a crash, with its disk and state."""
        guest = self.guest(name)
        start_all([guest])
        return self.node(name, guest)


def main() -> int:
    check_platform(need_network=True)
    logs = Path(tempfile.mkdtemp(prefix="applianced-demo-"))
    started = time.monotonic()
    with Lab(bridges=("lan", "hb")) as lab:
        pair = Pair(lab, logs)
        guests = {name: pair.guest(name) for name in LAN}
        client = Guest("client", logs / "client", lab=lab, nics=[Nic("lan", f"{CLIENT_ADDRESS}/24")])
        say(f"booting 3 guests (Debian kernel, QEMU/TCG) on two private networks; logs in {logs}")
        start_all([*guests.values(), client])
        try:
            say("starting applianced on each storage node (system bus, LIO, state in /var/lib/applianced)")
            nodes = {name: pair.node(name, guest) for name, guest in guests.items()}
            initiator = ApplianceNode(client)
            initiator.prepare(initiator_name=CLIENT_IQN)
            return 0 if run_demo(pair, nodes, initiator) else 1
        finally:
            for guest in [client, *reversed(pair.guests)]:
                guest.stop()
            say(f"done in {time.monotonic() - started:.0f} s; guests stopped, namespace removed")


def run_demo(pair: Pair, nodes: dict[str, StorageNode], client: ApplianceNode) -> bool:
    node1, node2 = nodes["node1"], nodes["node2"]
    say("node1: serving its disk with appliancectl; node2: its blank disk, to hold the copy")
    for args in (
        ("disk", "create-block", "vol1", "/dev/disk/by-id/virtio-vol", "--description", "the demo volume"),
        ("target", "create", "demo", "--iqn", TARGET),
        ("portal", "create", LAN["node1"]),
        ("lun", "add", "demo", "vol1"),
        ("acl", "add", "demo", CLIENT_IQN),
    ):
        node1.admin(*args)
    node2.admin("disk", "create-block", "copy1", "/dev/disk/by-id/virtio-vol", "--description", "vol1's copy")
    show("node1", node1.ctl("target", "list").stdout)
    show("node1", node1.ctl("disk", "list").stdout)
    serial = node1.ctl_json("disk", "list")[0]["serial"]

    say("client: SendTargets discovery and login (open-iscsi)")
    show("client", f"discovered on {LAN['node1']}: {' '.join(client.discover(LAN['node1']))}")
    client.login(TARGET, LAN["node1"])
    device = client.device_for_serial(serial)
    show("client", f"{TARGET} -> {device} (/dev/disk/by-lio-serial/{serial})")
    client.guest.run("head -c 8M /dev/urandom > /tmp/payload")
    client.guest.run(f"dd if=/tmp/payload of={device} bs=1M oflag=direct status=none")
    same = client.guest.run(f"dd if={device} bs=1M count=8 iflag=direct status=none | cmp - /tmp/payload", check=False)
    show("client", f"8 MiB written with O_DIRECT and read back: {'identical' if same.rc == 0 else 'DIFFERENT'}")
    show("node1", node1.ctl("target", "sessions", "demo").stdout)

    say("node1: restarting applianced while the client stays logged in")
    node1.stop()
    node1.start()
    show("node1", [line for line in node1.log().splitlines() if "reconciled at start-up" in line][-1])
    show("client", client.guest.run("iscsiadm -m session").stdout)

    if not (same.rc == 0 and replicate(nodes, client, device)):
        return False
    client.logout(TARGET, LAN["node1"])
    return fail_over(pair, nodes, client, serial)


def replicate(nodes: dict[str, StorageNode], client: ApplianceNode, device: str) -> bool:
    """Pair the nodes, mirror node1's disk to node2 in use, cut the link during writes."""
    node1, node2 = nodes["node1"], nodes["node2"]
    say("pairing the nodes over the replication network (a shared key, read from a file)")
    for node, peer in ((node1, node2), (node2, node1)):
        node.guest.write_file("/tmp/pair.key", "5a" * 32)
        node.admin("pair", "create", LINK[peer.name], "--aux-address", LAN[peer.name], "--key-file", "/tmp/pair.key")
    node1.wait_property(PEER_PATH, PEER_INTERFACE, "Connected", "b true", timeout=120)
    show("node1", node1.ctl("pair", "status").stdout)

    say("node1: mirroring vol1 to node2's copy1 while the client is logged in to it (sync mode)")
    node1.admin("mirror", "create", "vol1", "sync", "--peer-disk", "copy1")
    node1.ctl("mirror", "wait", "vol1", "--timeout", "900")
    show("node1", node1.ctl("mirror", "list").stdout)
    show("node2", node2.ctl("mirror", "list").stdout)

    say("node2's replication cable pulled while the client writes 32 regions of 64 KiB")
    node2.guest.set_link(up=False, slot=1)
    writes = "; ".join(
        f"dd if=/dev/urandom of={device} bs=64K seek={region} count=1 oflag=direct status=none || echo failed"
        for region in range(100, VOLUME // (64 * 1024), 61)
    )
    failed = client.guest.run(writes, timeout=600).stdout.count("failed")
    show("client", f"writes that failed: {failed}")
    node1.wait_property(mirror_path("vol1"), MIRROR_INTERFACE, "State", "u 4", timeout=120)
    show("node1", node1.ctl("mirror", "list").stdout)
    say("cable plugged back: the mirror resumes by itself and copies only what changed")
    node2.guest.set_link(up=True, slot=1)
    node1.ctl("mirror", "wait", "vol1", "--timeout", "600")
    show("node1", node1.ctl("mirror", "show", "vol1").stdout)
    return failed == 0 and same_copies(nodes)


def same_copies(nodes: dict[str, StorageNode]) -> bool:
    sums = {name: node.disk_checksum() for name, node in nodes.items()}
    show("both", f"md5 of the disks: node1 {sums['node1']}, node2 {sums['node2']}")
    return sums["node1"] == sums["node2"]


def fail_over(pair: Pair, nodes: dict[str, StorageNode], client: ApplianceNode, serial: str) -> bool:
    node1, node2 = nodes["node1"], nodes["node2"]
    say("failover: a virtual IP on the data LAN, the ping node, the target protected")
    pair.lab.add_address("lan", f"{PING_NODE}/24")
    lan = node1.guest.run(f"ip -o addr show to {LAN['node1']}/24 | awk '{{print $2}}'").stdout.strip()
    for node in nodes.values():
        node.admin("portal", "create", "0.0.0.0", "--port", VIP_PORT)
    for args in (
        ("failover", "add-address", lan, f"{VIP}/24"),
        ("failover", "add-ping-node", PING_NODE, lan),
        ("failover", "protect", "demo"),
        ("failover", "heartbeat", "0.5", "4"),
        ("failover", "start"),
    ):
        node1.admin(*args)
    node2.wait_failover("PeerHeard", "b true")
    show("node1", node1.ctl("failover", "status").stdout)
    show("node2", node2.ctl("failover", "status").stdout)

    say(f"client: logging in through the virtual IP {VIP}:{VIP_PORT}")
    client.discover(f"{VIP}:{VIP_PORT}")
    client.set_node(TARGET, f"{VIP}:{VIP_PORT}", FAILOVER_INITIATOR)
    client.login(TARGET, f"{VIP}:{VIP_PORT}")
    device = client.device_for_serial(serial)
    identity = client.guest.run(f"sg_inq -p 0x83 -H {device}").stdout
    node2.wait_failover("ClientConnections", "u 1")  # node2 knows the client's connection

    say("node1 killed (a power cut) while the client writes numbered 4 KiB blocks through the virtual IP")

    def kill_node1() -> None:
        node1.guest.power_off()
        node2.wait_failover("Role", 's "active"', timeout=120)

    written = write_through(client.guest, device, FAILOVER_BLOCKS, 1, kill_node1)
    report(written, node2, "the takeover")
    same_disk = client.guest.run(f"sg_inq -p 0x83 -H {device}").stdout == identity
    show(
        "client",
        f"device identification page (VPD 0x83) after the takeover: {'the same' if same_disk else 'DIFFERENT'}",
    )

    say("node1 boots again: passive (no automatic failback), its disk node2's copy, resynced partially")
    node1 = nodes["node1"] = pair.boot_again("node1")
    node1.wait_property(mirror_path("vol1"), MIRROR_INTERFACE, "Role", 's "target"', timeout=300)
    node2.ctl("mirror", "wait", "copy1", "--timeout", "600")
    show("node1", node1.ctl("failover", "status").stdout)
    resynced = node1.sectors_written(node1.guest.disk_device("vol")) * 512
    show("node1", f"the resync wrote {resynced // MIB} MiB of the {VOLUME // MIB} MiB disk")

    say("failback by hand, the client writing: appliancectl failover switchover on node2")
    node1.wait_failover("ClientConnections", "u 1")
    written_back = write_through(
        client.guest, device, FAILOVER_BLOCKS, 2, lambda: node2.admin("failover", "switchover")
    )
    report(written_back, node1, "the failback")
    node1.ctl("mirror", "wait", "vol1", "--timeout", "600")
    show("node1", node1.ctl("mirror", "list").stdout)
    ok = written.errors == written_back.errors == 0 and same_disk and same_copies(nodes)
    client.logout(TARGET, f"{VIP}:{VIP_PORT}")
    return ok


def report(written: Written, node: StorageNode, what: str) -> None:
    (event,) = json.loads(node.ctl("--json", "failover", "history").stdout)[-1:]
    show(node.name, f"{event['role']}: {event['reason']}")
    show(node.name, f"steps: {event['steps']}")
    show(
        "client",
        f"{written.acknowledged} writes acknowledged, {written.errors} failed, every acknowledged block read back; "
        f"longest write during {what}: {written.longest:.1f} s",
    )


if __name__ == "__main__":
    sys.exit(main())
