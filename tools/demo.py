"""The demo: a small SAN in QEMU guests, built and used the way an administrator would.

Two storage nodes run applianced; each serves a disk through appliancectl on its address
of a private data LAN (a bridge inside a network namespace made for the demo). A client
logs in to both with open-iscsi, writes to each LUN and reads it back. Then the nodes are
paired over a second private network, node1's disk is mirrored to node2 while the client
uses it, node2's replication cable is pulled during writes and plugged back, and the
partial resync and both copies are shown. Everything is torn down at the end. Nothing
leaves the demo's own namespace.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests.vm.appliance import ApplianceNode
from tests.vm.harness import Guest, Lab, Nic, check_platform, start_all

CLIENT_IQN = "iqn.2026-11.org.applianced.demo:client"
NODES = {"node1": "10.99.0.11", "node2": "10.99.0.12"}
# The replication network between the two nodes.
REPLICATION = {"node1": "10.98.0.11", "node2": "10.98.0.12"}
CLIENT_ADDRESS = "10.99.0.21"
DISKS = {"node1": "vol1", "node2": "vol2"}


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(node: str, result_text: str) -> None:
    for line in result_text.rstrip().splitlines():
        print(f"    [{node}] {line}")


def main() -> int:
    check_platform(need_network=True)
    logs = Path(tempfile.mkdtemp(prefix="applianced-demo-"))
    started = time.monotonic()
    with Lab(bridges=("lan", "hb")) as lab:
        nodes = {
            name: Guest(
                name, logs / name, lab=lab, nics=[Nic("lan", f"{address}/24"), Nic("hb", f"{REPLICATION[name]}/24")]
            )
            for name, address in NODES.items()
        }
        client = Guest("client", logs / "client", lab=lab, nics=[Nic("lan", f"{CLIENT_ADDRESS}/24")])
        guests = [*nodes.values(), client]
        say(f"booting {len(guests)} guests (Debian kernel, QEMU/TCG) on a private LAN; logs in {logs}")
        start_all(guests)
        try:
            return run_demo({name: ApplianceNode(guest) for name, guest in nodes.items()}, ApplianceNode(client))
        finally:
            for guest in reversed(guests):
                guest.stop()
            say(f"done in {time.monotonic() - started:.0f} s; guests stopped, namespace removed")


def run_demo(nodes: dict[str, ApplianceNode], client: ApplianceNode) -> int:
    say("starting applianced on each storage node (system bus, LIO, state in /var/lib/applianced)")
    for node in nodes.values():
        node.prepare()
        node.start()
    client.prepare(initiator_name=CLIENT_IQN)

    targets = {}
    for name, node in nodes.items():
        say(f"{name}: configuring with appliancectl")
        for args in (
            ("disk", "create", DISKS[name], "256M", "--description", f"demo volume on {name}"),
            ("target", "create", "demo", "--iqn", f"iqn.2026-11.org.applianced.demo:{name}"),
            ("portal", "create", NODES[name]),
            ("lun", "add", "demo", DISKS[name]),
            ("acl", "add", "demo", CLIENT_IQN),
        ):
            print(f"    [{name}] # appliancectl {' '.join(args)}")
            node.ctl(*args)
        show(name, node.ctl("target", "list").stdout)
        show(name, node.ctl("disk", "list").stdout)
        targets[name] = (node.ctl_json("target", "list")[0]["iqn"], node.ctl_json("disk", "list")[0]["serial"])

    say("client: SendTargets discovery and login to both nodes (open-iscsi)")
    for name, (iqn, serial) in targets.items():
        found = client.discover(NODES[name])
        show("client", f"discovered on {NODES[name]}: {' '.join(found)}")
        client.login(iqn, NODES[name])
        device = client.device_for_serial(serial)
        show("client", f"{iqn} -> {device} (/dev/disk/by-lio-serial/{serial})")
        client.guest.run("head -c 8M /dev/urandom > /tmp/payload")
        client.guest.run(f"dd if=/tmp/payload of={device} bs=1M oflag=direct status=none")
        read_back = f"dd if={device} bs=1M count=8 iflag=direct status=none | cmp - /tmp/payload"
        same = client.guest.run(read_back, check=False)
        show("client", f"8 MiB written with O_DIRECT and read back: {'identical' if same.rc == 0 else 'DIFFERENT'}")
        if same.rc != 0:
            return 1

    say("storage nodes: who is logged in")
    for name, node in nodes.items():
        show(name, node.ctl("target", "sessions", "demo").stdout)

    say("node1: restarting applianced while the client stays logged in")
    nodes["node1"].stop()
    nodes["node1"].start()
    show("node1", next(line for line in nodes["node1"].log().splitlines() if "reconciled at start-up" in line))
    show("client", client.guest.run("iscsiadm -m session").stdout)

    if not replicate(nodes, client, targets["node1"][1]):
        return 1
    for name, (iqn, _) in targets.items():
        client.logout(iqn, NODES[name])
    return 0


def replicate(nodes: dict[str, ApplianceNode], client: ApplianceNode, serial: str) -> bool:
    """Pair the nodes, mirror node1's disk to node2 in use, cut the link during writes."""
    node1, node2 = nodes["node1"], nodes["node2"]
    say("pairing the nodes over the replication network (a shared key, read from a file)")
    key = "5a" * 32
    for name, peer in (("node1", "node2"), ("node2", "node1")):
        nodes[name].guest.write_file("/tmp/pair.key", key)
        args = ("pair", "create", REPLICATION[peer], "--aux-address", NODES[peer], "--key-file", "/tmp/pair.key")
        print(f"    [{name}] # appliancectl {' '.join(args)}")
        nodes[name].ctl(*args)
    node1.guest.wait_until("/work/main/.venv/bin/appliancectl pair status | grep -q 'connected: *yes'", timeout=120)
    show("node1", node1.ctl("pair", "status").stdout)

    say("node1: mirroring vol1 to node2 while the client is logged in to it (sync mode)")
    print("    [node1] # appliancectl mirror create vol1 sync")
    node1.ctl("mirror", "create", "vol1", "sync")
    node1.ctl("mirror", "wait", "vol1", "--timeout", "600")
    show("node1", node1.ctl("mirror", "list").stdout)
    show("node2", node2.ctl("mirror", "list").stdout)
    show("node2", node2.ctl("disk", "list").stdout)

    device = client.device_for_serial(serial)
    say("node2's replication cable pulled while the client writes 32 regions of 64 KiB")
    node2.guest.set_link(up=False, slot=1)
    writes = "; ".join(
        f"dd if=/dev/urandom of={device} bs=64K seek={region} count=1 oflag=direct status=none || echo failed"
        for region in range(100, 4000, 122)
    )
    failed = client.guest.run(writes, timeout=600).stdout.count("failed")
    show("client", f"writes that failed: {failed}")
    node1.guest.wait_until("test $(/work/main/.venv/bin/appliancectl mirror state vol1) = 4", timeout=120)
    show("node1", node1.ctl("mirror", "list").stdout)
    say("cable plugged back: the mirror resumes by itself and copies only what changed")
    node2.guest.set_link(up=True, slot=1)
    node1.ctl("mirror", "wait", "vol1", "--timeout", "600")
    show("node1", node1.ctl("mirror", "show", "vol1").stdout)
    sums = {
        name: node.guest.run("head -c 268435456 /var/lib/applianced/disks/vol1.img | md5sum").stdout.split()[0]
        for name, node in nodes.items()
    }
    show("both", f"md5 of vol1: node1 {sums['node1']}, node2 {sums['node2']}")
    return failed == 0 and sums["node1"] == sums["node2"]


if __name__ == "__main__":
    sys.exit(main())
