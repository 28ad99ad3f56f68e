"""Benchmark: the stall a client sees when the active node dies and at a planned switchover,
applianced against the classic stack (DRBD protocol C + keepalived VRRP + LIO built by a
notify script), on the same guests, disks and networks.

Three QEMU guests (the VM harness, TCG) on two bridges inside a test-made namespace: two
storage nodes, ``a`` and ``b``, paired over ``hb``, and a client on ``lan`` (open-iscsi, the
same initiator settings for every stack: DefaultTime2Wait 0, the rest Debian's defaults).
Each node has two virtio disks on sparse host files, kept across its reboots: ``vol`` for
applianced's mirror, ``drbd`` for DRBD's (internal metadata). The ping node is an address
of the namespace itself on ``lan``.

A round, for each stack: the client writes numbered 4 KiB blocks with O_DIRECT through the
virtual IP, one after the other, and node a's QEMU is killed (a power cut); the client's
longest write is the **crash stall**. Every acknowledged block must read back. Node a boots
again, comes back as the copy and is resynced (**back in sync**: from its boot until every
mirror is in sync again); then the service goes back to it by hand while the client writes:
the longest write is the **planned stall**. With ``--planned-only`` a round has no crash:
the service switches over from a to b and back, each stall measured, the mirrors (or
DRBD) back in sync before the next. Each stack runs its rounds on freshly booted nodes,
one stack after the other:

* ``applianced``: the pair, ``vol`` mirrored in sync mode, the target protected, heartbeat
  ``--heartbeat`` (interval and misses; the README's 0.5 s x 4 by default); the failback
  is ``appliancectl failover switchover``. The new active node's history gives each
  takeover step.
* ``applianced-64luns`` (not in the default set): the same with 64 LUNs in the protected
  target, each its own sync mirror (``d1`` and 63 file disks of 8 MiB), nodes with
  2.5 GiB; the client writes to ``d1`` and every mirror must be in sync again before the
  failback.
* ``classic``, ``classic-100ms``: DRBD 8.4 on ``drbd`` (ping-int 2 s, ping-timeout 0.5 s,
  so that DRBD itself sees a dead peer as soon as VRRP does), keepalived with one VRRPv3
  instance (both nodes BACKUP with nopreempt, advert 1 s or 0.1 s). Its notify script on
  the new MASTER retries ``drbdadm primary`` until DRBD lets it (it refuses while it still
  sees the old primary) and runs ``targetctl restore`` of the same LIO configuration (unit
  serial, IQN, LUN, ACL, DefaultTime2Wait 0); on BACKUP or FAULT it clears LIO and
  demotes (the scripts take a lock: keepalived does not wait for one before it starts the
  next). The failback by hand: the active node clears LIO, demotes DRBD and stops
  keepalived (which then advertises priority 0), and starts it again once the other
  serves. The script stamps each step in the new MASTER's clock.

Detection is worked out in the new active node's clock: the host's kill time, moved by
that guest's clock offset (measured just before, to within half a round trip), to the
moment the node started its first takeover after it. Under emulation absolute numbers mean little; the
ratios of one run are the result. Run as root from the checkout, after ``tools/setup``:

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/failover.py [--rounds 2] \
        [--stacks applianced,applianced-64luns] [--planned-only]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from applianced.bus.paths import mirror_path
from applianced.constants import (
    BUS_NAME,
    FAILOVER_INTERFACE,
    FAILOVER_PATH,
    MIRROR_INTERFACE,
    PEER_INTERFACE,
    PEER_PATH,
)
from tests.vm.appliance import FAILOVER_INITIATOR, VENV_BIN, ApplianceNode
from tests.vm.harness import Disk, Guest, HarnessError, Lab, Nic, check_platform, start_all
from tests.vm.sequenced_writes import BLOCK, write_through

MIB = 1 << 20
DISK_SIZE = 128 * MIB
# The blocks the client writes in a round (DRBD's internal metadata is at the disk's end).
BLOCKS = range(16 * MIB // BLOCK, 112 * MIB // BLOCK)
LAN = {"a": "10.72.0.1", "b": "10.72.0.2", "client": "10.72.0.10"}
HB = {"a": "10.73.0.1", "b": "10.73.0.2"}
MACS = {"a": ("52:54:00:72:00:01", "52:54:00:73:00:01"), "b": ("52:54:00:72:00:02", "52:54:00:73:00:02")}
PING_NODE = "10.72.0.254"
VIP = "10.72.0.100"
INITIATOR = "iqn.2026-12.org.applianced.bench:failover-client"
TARGET = "iqn.2026-12.org.applianced.bench:failover"
# applianced's wildcard portal for the VIP (each node's own portal stays on 3260).
OURS_PORT = 3261
CLASSIC_PORT = 3260
CLASSIC_SERIAL = "5eedfa11-0000-4000-8000-c1a551c00001"
DRBD_DISK = "/dev/disk/by-id/virtio-drbd"
STATE_DIR = "/var/lib/applianced"
# applianced-64luns: the LUNs beyond the first are file disks in the state directory (kept
# across reboots), mirrored a few per start of appliancectl.
EXTRA_DISK_SIZE = "8M"
MIRRORS_PER_BATCH = 8
# How long a takeover or a switchover may take here (64 LUNs under TCG: minutes).
SLOWEST_ROLE_CHANGE = 900
# The classic stack's files, written at each boot (/run is the guest's own tmpfs); the
# directory is root's alone, as keepalived's script security wants.
RUN = "/run/bench"

DRBD_RESOURCE = f"""
resource r0 {{
  protocol C;
  net {{ ping-int 2; ping-timeout 5; connect-int 2; timeout 10; }}
  on a {{ device /dev/drbd0; disk {DRBD_DISK}; address {HB["a"]}:7789; meta-disk internal; }}
  on b {{ device /dev/drbd0; disk {DRBD_DISK}; address {HB["b"]}:7789; meta-disk internal; }}
}}
"""
KEEPALIVED = """
global_defs {{
  router_id {name}
  # VRRPv2 rounds its advertisement interval to whole seconds; version 3 takes 0.1 s.
  vrrp_version 3
  script_user root
  enable_script_security
}}
vrrp_instance bench {{
  state BACKUP
  nopreempt
  interface {interface}
  virtual_router_id 72
  priority {priority}
  advert_int {advert}
  virtual_ipaddress {{
    {vip}/24 dev {interface}
  }}
  notify_master {run}/master.sh
  notify_backup {run}/backup.sh
  notify_fault {run}/backup.sh
}}
"""
# keepalived starts notify scripts without waiting for the one before: a node that goes from
# BACKUP (at its start) to MASTER 0.3 s later would clear LIO under its own restore. Each
# script holds a lock, as deployments of this stack do.
MASTER_SCRIPT = f"""#!/bin/sh
# keepalived made this node MASTER: promote DRBD (it refuses while it still sees the other
# primary), then build LIO from the saved configuration.
stamp() {{ echo "$1 $(date +%s.%N)" >> {RUN}/events; }}
stamp master
exec 9>{RUN}/lock
flock 9
tries=0
until drbdadm primary r0 2>/dev/null; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || exit 1; sleep 0.1
done
stamp primary
targetctl restore {RUN}/lio.json
stamp served
"""
BACKUP_SCRIPT = f"""#!/bin/sh
# keepalived made this node BACKUP (or saw a fault): stop serving, demote DRBD.
exec 9>{RUN}/lock
flock 9
targetctl clear
drbdadm secondary r0
echo "backup $(date +%s.%N)" >> {RUN}/events
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clock_offset(guest: Guest) -> float:
    """The guest's clock minus the host's, to within half the round trip of one command."""
    before = time.time()
    guest_time = float(guest.run("date +%s.%N").stdout)
    after = time.time()
    return guest_time - (before + after) / 2


def classic_lio(serial: str) -> dict[str, Any]:
    """What the classic stack's notify script restores: a block backstore on DRBD, the target
    with its LUN, the client's ACL and a wildcard portal, in targetctl's saved format."""
    return {
        "storage_objects": [{"plugin": "block", "name": "d1", "dev": "/dev/drbd0", "wwn": serial}],
        "targets": [
            {
                "fabric": "iscsi",
                "wwn": TARGET,
                "tpgs": [
                    {
                        "tag": 1,
                        "enable": True,
                        "attributes": {"authentication": 0, "generate_node_acls": 0},
                        "parameters": {"DefaultTime2Wait": "0"},
                        "portals": [{"ip_address": "0.0.0.0", "port": CLASSIC_PORT}],
                        "luns": [{"index": 0, "storage_object": "/backstores/block/d1"}],
                        "node_acls": [
                            {"node_wwn": INITIATOR, "mapped_luns": [{"index": 0, "tpg_lun": 0, "write_protect": False}]}
                        ],
                    }
                ],
            }
        ],
    }


class Nodes:
    """The two storage nodes of one stack: each boots again after a crash with its disks,
    its state and its MACs; ``setup`` makes a freshly booted node ready for the stack."""

    def __init__(
        self, lab: Lab, logs: Path, stack: str, setup: Callable[[str, Guest], ApplianceNode], memory: str = "1280M"
    ) -> None:
        self.lab, self.logs, self.stack, self.setup, self.memory = lab, logs, stack, setup, memory
        self.boots = 0
        self.guests: list[Guest] = []
        self.nodes: dict[str, ApplianceNode] = {}

    def _guest(self, name: str) -> Guest:
        self.boots += 1
        state = self.logs / f"{self.stack}-{name}-state"
        state.mkdir(exist_ok=True)
        guest = Guest(
            f"{self.stack}-{name}-{self.boots}",
            self.logs / f"{self.stack}-{name}-{self.boots}",
            lab=self.lab,
            memory=self.memory,
            disks=[Disk(disk, DISK_SIZE, path=self.logs / f"{name}-{disk}.img") for disk in ("vol", "drbd")],
            nics=[Nic("lan", f"{LAN[name]}/24", mac=MACS[name][0]), Nic("hb", f"{HB[name]}/24", mac=MACS[name][1])],
            rwdirs={STATE_DIR: state},
        )
        self.guests.append(guest)
        return guest

    def boot(self, *names: str) -> None:
        guests = {name: self._guest(name) for name in names}
        start_all(guests.values())
        for name, guest in guests.items():
            self.nodes[name] = self.setup(name, guest)

    def crash(self, name: str) -> None:
        self.nodes[name].guest.power_off()

    def stop(self) -> None:
        for guest in self.guests:
            guest.stop()


class Client:
    def __init__(self, guest: Guest) -> None:
        # open-iscsi, and the udev rule that names a LUN by its unit serial
        self.node = ApplianceNode(guest).prepare(initiator_name=INITIATOR)
        self.guest = guest
        self.tag = 0

    def log_in(self, port: int, serial: str) -> str:
        portal = f"{VIP}:{port}"
        self.node.discover(portal)
        self.node.set_node(TARGET, portal, FAILOVER_INITIATOR)
        self.node.login(TARGET, portal)
        return self.node.device_for_serial(serial, timeout=120)

    def log_out(self, port: int) -> None:
        self.node.logout(TARGET, f"{VIP}:{port}")
        self.guest.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", TARGET], check=False)

    def stall(self, device: str, event: Callable[[], None]) -> float:
        """The longest write while ``event`` happens; no write may fail, none may be lost."""
        self.tag += 1
        written = write_through(self.guest, device, BLOCKS, self.tag, event, limit=SLOWEST_ROLE_CHANGE + 60)
        assert written.errors == 0 and written.acknowledged > 0, written
        return written.longest


# -- applianced ------------------------------------------------------------------------


class Ours:
    """The pair as the README sets it up: a mirror in sync mode, a VIP, a ping node."""

    port = OURS_PORT

    def __init__(self, lab: Lab, logs: Path, label: str, heartbeat: tuple[str, str], luns: int = 1) -> None:
        # Each mirror of the copy node runs its own NBD server: room for 64 of them.
        self.nodes = Nodes(lab, logs, label, self._start, memory="1280M" if luns == 1 else "2560M")
        # A node booted again assembles its 64 sources before it is ready: minutes under TCG.
        self.ready_timeout = 180 if luns == 1 else SLOWEST_ROLE_CHANGE
        self.heartbeat = heartbeat
        # d1 (the virtio disk, the LUN the client writes) and small file disks for the rest.
        self.disks = ["d1", *(f"v{lun}" for lun in range(1, luns))]

    def _start(self, name: str, guest: Guest) -> ApplianceNode:
        node = ApplianceNode(guest).prepare()
        node.start(self.ready_timeout)
        return node

    def build(self) -> str:
        self.nodes.boot("a", "b")
        a, b = self.nodes.nodes["a"], self.nodes.nodes["b"]
        for node, peer in ((a, "b"), (b, "a")):
            node.guest.write_file("/tmp/pair.key", "6b" * 32)
            node.ctl("pair", "create", HB[peer], "--aux-address", LAN[peer], "--key-file", "/tmp/pair.key")
        a.wait_property(PEER_PATH, PEER_INTERFACE, "Connected", "b true", timeout=120)
        lan = a.guest.run(f"ip -o addr show to {LAN['a']}/24 | awk '{{print $2}}'").stdout.strip()
        a.ctl_batch(
            ("disk", "create-block", "d1", "/dev/disk/by-id/virtio-vol"),
            ("target", "create", "t1", "--iqn", TARGET),
            ("lun", "add", "t1", "d1"),
            ("acl", "add", "t1", INITIATOR),
            ("portal", "create", "0.0.0.0", "--port", str(OURS_PORT)),
        )
        b.ctl_batch(
            ("disk", "create-block", "c1", "/dev/disk/by-id/virtio-vol"),
            ("portal", "create", "0.0.0.0", "--port", str(OURS_PORT)),
        )
        # Both disks are blank files: nothing to copy at first.
        a.ctl("mirror", "create", "d1", "sync", "--peer-disk", "c1", "--skip-initial-sync")
        extra = self.disks[1:]
        for start in range(0, len(extra), MIRRORS_PER_BATCH):
            chunk = extra[start : start + MIRRORS_PER_BATCH]
            a.ctl_batch(
                *(("disk", "create", disk, EXTRA_DISK_SIZE) for disk in chunk),
                *(("lun", "add", "t1", disk) for disk in chunk),
                # The peer makes each copy: a new sparse file, as blank as its source.
                *(("mirror", "create", disk, "sync", "--skip-initial-sync") for disk in chunk),
            )
        self._wait_in_sync(a, timeout=300 + 10 * len(extra))
        a.ctl_batch(
            ("failover", "add-address", lan, f"{VIP}/24"),
            ("failover", "add-ping-node", PING_NODE, lan),
            ("failover", "protect", "t1"),
            ("failover", "heartbeat", *self.heartbeat),
            ("failover", "start"),
        )
        b.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "PeerHeard", "b true", timeout=120)
        return next(d["serial"] for d in a.ctl_json("disk", "list") if d["name"] == "d1")

    def ready(self, passive: str) -> None:
        """Wait until the passive node knows the client's connection (to reset it) and holds
        every LUN made in advance (its copies' arrays prepared, none forked anew for 10 s):
        the pair as it runs, not as it settles after a resync."""
        node = self.nodes.nodes[passive]
        node.wait_property(FAILOVER_PATH, FAILOVER_INTERFACE, "ClientConnections", "u 1", timeout=120)
        luns = f"/sys/kernel/config/target/iscsi/{TARGET}/tpgt_1/lun"
        count = f"ls {luns} 2>/dev/null | wc -l"
        looks: list[str] = []
        deadline = time.monotonic() + SLOWEST_ROLE_CHANGE
        while len(looks) < 3 or looks[-3:] != [str(len(self.disks))] * 3:
            if time.monotonic() > deadline:
                raise HarnessError(f"{passive} holds {looks[-1]} of {len(self.disks)} LUNs made in advance")
            looks.append(node.guest.run(count).stdout.strip())
            time.sleep(5)

    def wait_active(self, name: str) -> None:
        # The client measures the stall, not this wait: a read every five seconds takes
        # less of the CPU that the takeover being measured runs on (busctl in the guest: at
        # least 0.2 s a read, measured on a property of dbus-daemon itself).
        node = self.nodes.nodes[name]
        node.wait_property(
            FAILOVER_PATH, FAILOVER_INTERFACE, "Role", 's "active"', timeout=SLOWEST_ROLE_CHANGE, interval=5.0
        )

    def takeover_steps(self, name: str, after: float) -> tuple[float, dict[str, float]]:
        """When the first takeover of node ``name`` since ``after`` started (its clock), and
        its steps: a node that took over twice (it stopped serving in between) is measured
        by the takeover the crash caused."""
        read = ["busctl", "--system", "--json=short", "get-property", BUS_NAME, FAILOVER_PATH]
        out = self.nodes.nodes[name].guest.run([*read, FAILOVER_INTERFACE, "History"]).stdout
        when, _, _, steps = next(
            event for event in json.loads(out)["data"] if event[0] >= after and event[1] == "active"
        )
        return when - sum(seconds for _, seconds in steps), {step: seconds for step, seconds in steps}

    def rejoin(self, name: str) -> None:
        """Node ``name``, booted again, is the copy again and in sync."""
        node = self.nodes.nodes[name]
        node.wait_property(mirror_path("d1"), MIRROR_INTERFACE, "Role", 's "target"', timeout=300)
        # A copy's resync starts one after another on an emulated node (10-17 s each with
        # 64 LUNs): the limit only stops a harness that would wait for ever.
        self._wait_in_sync(self.nodes.nodes["b"], timeout=600 + 30 * len(self.disks))

    def _wait_in_sync(self, node: ApplianceNode, timeout: float) -> None:
        """Every mirror of the pair mirroring, as ``node`` sees it (a bus read every 5 s)."""
        deadline = time.monotonic() + timeout
        while node.mirrors_in_state(1) < len(self.disks):
            if time.monotonic() > deadline:
                raise HarnessError(f"{node.guest.name}: the mirrors are not all in sync after {timeout:.0f} s")
            time.sleep(5)

    def switch_over(self, active: str) -> None:
        """The planned switchover, run on the ``active`` node."""
        # Under emulation a switchover of 64 LUNs outlasts the harness's call timeout.
        switchover = [str(VENV_BIN / "appliancectl"), "--call-timeout", "0", "failover", "switchover"]
        self.nodes.nodes[active].guest.run(switchover, timeout=SLOWEST_ROLE_CHANGE)

    def settle(self, active: str) -> None:
        """After a switchover: every mirror back in sync, as the new ``active`` node sees it
        (the reverse resync is partial)."""
        self._wait_in_sync(self.nodes.nodes[active], timeout=600 + 30 * len(self.disks))


# -- DRBD + keepalived + LIO from a notify script -----------------------------------------


class Classic:
    port = CLASSIC_PORT

    def __init__(self, lab: Lab, logs: Path, label: str, advert: str) -> None:
        self.nodes = Nodes(lab, logs, label, self._start)
        self.advert = advert
        self.first = True

    def _start(self, name: str, guest: Guest) -> ApplianceNode:
        """A booted node: LIO and DRBD loaded, the resource up (made on the first boot),
        keepalived's configuration and scripts in place, keepalived not started yet."""
        node = ApplianceNode(guest)
        guest.setup_storage()
        guest.run(f"hostname {name} && modprobe drbd && mkdir -p -m 0700 {RUN} && chmod 0755 {RUN}")
        guest.write_file("/etc/drbd.d/r0.res", DRBD_RESOURCE)
        make = "yes yes | drbdadm create-md --force r0 && " if self.first else ""
        guest.run(f"{make}drbdadm up r0", timeout=300)
        interface = guest.run(f"ip -o addr show to {LAN[name]}/24 | awk '{{print $2}}'").stdout.strip()
        config = KEEPALIVED.format(
            name=name, interface=interface, priority=100 if name == "a" else 90, advert=self.advert, vip=VIP, run=RUN
        )
        guest.write_file(f"{RUN}/keepalived.conf", config, mode=0o644)
        guest.write_file(f"{RUN}/master.sh", MASTER_SCRIPT, mode=0o755)
        guest.write_file(f"{RUN}/backup.sh", BACKUP_SCRIPT, mode=0o755)
        guest.write_file(f"{RUN}/lio.json", json.dumps(classic_lio(CLASSIC_SERIAL)), mode=0o600)
        return node

    def _keepalived(self, name: str) -> None:
        self.nodes.nodes[name].guest.spawn(
            "keepalived",
            ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp", "-f", f"{RUN}/keepalived.conf"],
        )

    def _events(self, name: str) -> dict[str, float]:
        """The last time of each step the notify scripts of node ``name`` stamped."""
        lines = self.nodes.nodes[name].guest.run(f"cat {RUN}/events 2>/dev/null || true").stdout.split("\n")
        return {step: float(at) for step, at in (line.split() for line in lines if line)}

    def build(self) -> str:
        self.nodes.boot("a", "b")
        self.first = False
        a, b = self.nodes.nodes["a"].guest, self.nodes.nodes["b"].guest
        a.wait_until("drbdadm cstate r0 | grep -qx Connected", timeout=120)
        a.run("drbdadm -- --clear-bitmap new-current-uuid r0")
        a.wait_until("drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=120)
        # a first, so that it is the MASTER; b then hears it and stays BACKUP.
        self._keepalived("a")
        a.wait_until(f"grep -q '^served' {RUN}/events", timeout=120)
        self._keepalived("b")
        b.wait_until(f"grep -q '^backup' {RUN}/events", timeout=120)
        return CLASSIC_SERIAL

    def ready(self, passive: str) -> None:
        """Forget the passive node's stamps: the next ones are its takeover's. (The classic
        stack knows no client connections.)"""
        self.nodes.nodes[passive].guest.run(f"rm -f {RUN}/events")

    def wait_active(self, name: str) -> None:
        self.nodes.nodes[name].guest.wait_until(f"grep -q '^served' {RUN}/events", timeout=120, interval=0.2)

    def takeover_steps(self, name: str, after: float) -> tuple[float, dict[str, float]]:
        events = self._events(name)  # cleared before each round: this round's only
        return events["master"], {
            "promote DRBD": events["primary"] - events["master"],
            "build LIO": events["served"] - events["primary"],
        }

    def rejoin(self, name: str) -> None:
        guest = self.nodes.nodes[name].guest
        self._keepalived(name)
        guest.wait_until(f"grep -q '^backup' {RUN}/events", timeout=120)
        self.nodes.nodes["b"].guest.wait_until(
            "drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=600, interval=1.0
        )

    def switch_over(self, active: str) -> None:
        """By hand: the ``active`` node stops serving and leaves; the other's keepalived
        takes the VIP."""
        other = "a" if active == "b" else "b"
        guest = self.nodes.nodes[active].guest
        guest.run(f"{RUN}/backup.sh")
        guest.kill("keepalived", timeout=30)
        self.nodes.nodes[other].guest.wait_until(f"grep -q '^served' {RUN}/events", timeout=120, interval=0.2)
        self._keepalived(active)

    def settle(self, active: str) -> None:
        """After a switchover: DRBD connected and up to date again."""
        self.nodes.nodes[active].guest.wait_until(
            "drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=600, interval=1.0
        )


# -- the rounds ---------------------------------------------------------------------------


# One round of a stack, on the client's device: what it measured.
Round = Callable[[Ours | Classic, Client, str], dict[str, Any]]


def rounds(stack: Ours | Classic, client: Client, count: int, one_round: Round) -> list[dict[str, Any]]:
    """Build the stack, log the client in through the VIP and run ``count`` rounds."""
    serial = stack.build()
    device = client.log_in(stack.port, serial)
    samples = []
    try:
        for index in range(count):
            sample = one_round(stack, client, device)
            log(f"{stack.nodes.stack} round {index + 1}: {json.dumps(sample)}")
            samples.append(sample)
    finally:
        client.log_out(stack.port)
    return samples


def crash_round(stack: Ours | Classic, client: Client, device: str) -> dict[str, Any]:
    """Node a killed while the client writes, back in sync, then the failback by hand."""
    stack.ready("b")
    b = stack.nodes.nodes["b"].guest
    offset = clock_offset(b)
    killed = 0.0

    def kill_a() -> None:
        nonlocal killed
        killed = time.time()
        stack.nodes.crash("a")
        stack.wait_active("b")

    crash = client.stall(device, kill_a)
    started, steps = stack.takeover_steps("b", after=killed + offset)
    detection = started - (killed + offset)
    booted = time.monotonic()
    stack.nodes.boot("a")
    stack.rejoin("a")
    back_in_sync = time.monotonic() - booted
    stack.ready("a")
    planned = client.stall(device, lambda: stack.switch_over("b"))
    return {
        "crash_stall_s": crash,
        "detection_s": detection,
        "steps_s": steps,
        "back_in_sync_s": back_in_sync,
        "planned_stall_s": planned,
    }


def planned_round(stack: Ours | Classic, client: Client, device: str) -> dict[str, Any]:
    """``--planned-only``: a switchover from a to b and one back, no crash."""
    stall = {}
    for active, passive in (("a", "b"), ("b", "a")):
        stack.ready(passive)
        stall[active] = client.stall(device, lambda active=active: stack.switch_over(active))
        stack.settle(passive)
    return {"planned_stall_s": stall["a"], "planned_back_stall_s": stall["b"]}


def planned_summary(samples: dict[str, list[dict[str, Any]]]) -> str:
    base = "classic" if "classic" in samples else next(iter(samples))
    keys = ("planned_stall_s", "planned_back_stall_s")
    stalls = {name: [sample[key] for sample in runs for key in keys] for name, runs in samples.items()}
    lines = [f"| stack | planned stall s (median) | vs {base} | samples |", "|---|---:|---:|---|"]
    for name, values in stalls.items():
        median = statistics.median(values)
        ratio = median / statistics.median(stalls[base])
        lines.append(f"| {name} | {median:.1f} | {ratio:.2f} | {', '.join(f'{v:.1f}' for v in values)} |")
    return "\n".join(lines)


def summary(samples: dict[str, list[dict[str, Any]]]) -> str:
    def median(name: str, key: str) -> float:
        return statistics.median(sample[key] for sample in samples[name])

    base = "classic" if "classic" in samples else next(iter(samples))
    lines = [
        f"| stack | crash stall s | vs {base} | detection s | back in sync s | planned stall s | vs {base} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in samples:
        crash, planned = median(name, "crash_stall_s"), median(name, "planned_stall_s")
        back = median(name, "back_in_sync_s")
        lines.append(
            f"| {name} | {crash:.1f} | {crash / median(base, 'crash_stall_s'):.2f} | {median(name, 'detection_s'):.1f} "
            f"| {back:.0f} | {planned:.1f} | {planned / median(base, 'planned_stall_s'):.2f} |"
        )
    lines.append("")
    for name in samples:
        steps = {step for sample in samples[name] for step in sample["steps_s"]}
        medians = {step: statistics.median(s["steps_s"].get(step, 0.0) for s in samples[name]) for step in steps}
        lines.append(f"{name} takeover steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    return "\n".join(lines)


STACKS = {
    "applianced": lambda lab, logs, args: Ours(lab, logs, "applianced", tuple(args.heartbeat.split(","))),
    "applianced-64luns": lambda lab, logs, args: Ours(
        lab, logs, "applianced-64luns", tuple(args.heartbeat.split(",")), luns=64
    ),
    "classic": lambda lab, logs, args: Classic(lab, logs, "classic", "1"),
    "classic-100ms": lambda lab, logs, args: Classic(lab, logs, "classic-100ms", "0.1"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="crash and failback rounds per stack (medians)")
    parser.add_argument(
        "--stacks",
        default="applianced,classic,classic-100ms",
        help=f"comma-separated, run in this order: {', '.join(STACKS)}",
    )
    parser.add_argument("--heartbeat", default="0.5,4", help="applianced's heartbeat interval and misses")
    parser.add_argument("--output", type=Path, help="raw samples as JSON")
    parser.add_argument(
        "--planned-only", action="store_true", help="no crash: each round switches over from a to b and back"
    )
    args = parser.parse_args(argv)
    names = args.stacks.split(",")
    unknown = set(names) - set(STACKS)
    if unknown:
        parser.error(f"unknown stacks: {', '.join(sorted(unknown))}")
    check_platform(need_network=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    samples: dict[str, list[dict[str, Any]]] = {}
    with Lab(bridges=("lan", "hb")) as lab:
        lab.add_address("lan", f"{PING_NODE}/24")
        client_guest = Guest("bench-client", logs / "client", nics=[Nic("lan", f"{LAN['client']}/24")], lab=lab)
        client_guest.start()
        try:
            client = Client(client_guest)
            for name in names:
                stack = STACKS[name](lab, logs, args)
                try:
                    one_round = planned_round if args.planned_only else crash_round
                    samples[name] = rounds(stack, client, args.rounds, one_round)
                finally:
                    stack.nodes.stop()
        finally:
            client_guest.stop()
    print((planned_summary if args.planned_only else summary)(samples))
    if args.output:
        args.output.write_text(json.dumps(samples, indent=2))
    log(f"guest logs: {logs}; command: {shlex.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
