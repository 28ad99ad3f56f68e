"""Commands of ``appliancectl``: argument parsing, calls over D-Bus, tables and JSON."""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import shlex
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from applianced import __version__
from applianced.cli.client import CallTimeout, Client, DBusError, run_without_loop
from applianced.cli.messages import NO_BUS, UsageError, describe, describe_timeout
from applianced.cli.wire import Variant, unpack_variants
from applianced.constants import (
    ACL_INTERFACE,
    BOOT_PROFILE_INTERFACE,
    CLOCK_OFFSET_WARNING,
    DISK_INTERFACE,
    FAILOVER_INTERFACE,
    FAILOVER_PATH,
    ISCSI_DEFAULT_PORT,
    JOB_INTERFACE,
    LUN_INTERFACE,
    MANAGER_INTERFACE,
    MIRROR_INTERFACE,
    PEER_DEFAULT_PORT,
    PEER_INTERFACE,
    PEER_PATH,
    PORTAL_INTERFACE,
    ROOT_PATH,
    TARGET_INTERFACE,
)
from applianced.errors import InvalidArgument
from applianced.units import format_size, parse_size

# typing is for checkers only: importing it is a tenth of the CLI's start (see client.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EXIT_NOT_FOUND = 3
EXIT_INVALID = 5
# The slowest calls measured under TCG: a switchover of 64 mirrors gave up after 56 s, an
# import of 200 targets took 17 s (bench/README.md). Twice that, and a script still learns
# within minutes that the daemon stopped answering.
DEFAULT_CALL_TIMEOUT = 120.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliancectl", description="Control applianced over D-Bus.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--version", action="version", version=f"appliancectl {__version__}")
    parser.add_argument(
        "--call-timeout",
        type=_seconds,
        default=DEFAULT_CALL_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on a call applianced has not answered in this time (default {DEFAULT_CALL_TIMEOUT:g}; 0: never)",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    groups.add_parser("status", help="show the node and what it serves")

    disk = groups.add_parser("disk", help="virtual disks").add_subparsers(dest="action", required=True)
    disk.add_parser("list", help="list disks")
    create = disk.add_parser("create", help="create a sparse file-backed disk")
    create.add_argument("name")
    create.add_argument("size", help="size with a unit, e.g. 10G, 512MiB, 1TB")
    create.add_argument("--path", default="", help="backing file (default: in the state directory)")
    create.add_argument("--description", default="")
    create.add_argument(
        "--write-back", action="store_true", help="cache writes in the node's memory (faster; a power cut loses data)"
    )
    block = disk.add_parser("create-block", help="export a block device or partition (LV, RAID, disk)")
    block.add_argument("name")
    block.add_argument("device", help="e.g. /dev/vg0/lv1 or /dev/disk/by-id/...")
    block.add_argument("--description", default="")
    imported = disk.add_parser("import", help="take over a disk file made by applianced, keeping its identity")
    imported.add_argument("path")
    imported.add_argument("--name", default="", help="name on this node (default: the name it had)")
    imported.add_argument("--description", default="")
    extend = disk.add_parser("extend", help="grow a disk, also while initiators use it")
    extend.add_argument("name")
    extend.add_argument("size", help="new size with a unit, e.g. 200G")
    modify = disk.add_parser("modify", help="change a disk's description, sharing or backstore")
    modify.add_argument("name")
    modify.add_argument("--description")
    sharing = modify.add_mutually_exclusive_group()
    sharing.add_argument(
        "--shared", dest="shared", action="store_true", default=None, help="allow several targets to export it"
    )
    sharing.add_argument("--exclusive", dest="shared", action="store_false", help="one target at most (the default)")
    modify.add_argument(
        "--backstore",
        choices=["dm", "direct"],
        help="dm: on a device of its own (needed to mirror it); its backstore is made again",
    )
    modify.add_argument("--force", action="store_true", help="change the backstore though initiators use the disk")
    delete = disk.add_parser("delete", help="delete a disk (the backing file is kept)")
    delete.add_argument("name")
    delete.add_argument("--remove-file", action="store_true", help="also delete the backing file")

    target = groups.add_parser("target", help="iSCSI targets").add_subparsers(dest="action", required=True)
    target.add_parser("list", help="list targets")
    create = target.add_parser("create", help="create a target")
    create.add_argument("name")
    create.add_argument("--iqn", default="", help="IQN (default: generated from the name)")
    create.add_argument("--description", default="")
    create.add_argument("--alias", default="", help="alias shown to initiators (default: the name)")
    modify = target.add_parser("modify", help="change a target's settings")
    modify.add_argument("name")
    modify.add_argument("--description")
    modify.add_argument("--alias")
    modify.add_argument("--iqn", help="new IQN (initiators must be reconfigured)")
    for digest in ("header", "data"):
        modify.add_argument(
            f"--{digest}-digest", choices=["allowed", "required", "off"], help=f"CRC32C {digest} digests"
        )
    state = modify.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_true", default=None)
    state.add_argument("--disable", dest="enabled", action="store_false")
    modify.add_argument("--force", action="store_true", help="even if it disrupts logged-in initiators")
    delete = target.add_parser("delete", help="delete a target")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="even if initiators are logged in")
    show = target.add_parser("sessions", help="list the sessions of a target")
    show.add_argument("name")
    paths_of = target.add_parser("connections", help="list every TCP connection (path) on a target's portals")
    paths_of.add_argument("name")
    logout = target.add_parser("logout", help="drop an initiator's sessions (it may log in again)")
    logout.add_argument("name")
    logout.add_argument("initiator")
    allow = target.add_parser("allow", help="admit only these sources to the target's portals (replaces the list)")
    allow.add_argument("name")
    allow.add_argument("sources", nargs="*", metavar="SOURCE", help="IP address or network, MAC address, DNS name")
    allow.add_argument("--clear", action="store_true", help="admit any source again")
    allow.add_argument("--force", action="store_true", help="even if it cuts off logged-in initiators")

    portal = groups.add_parser("portal", help="network portals").add_subparsers(dest="action", required=True)
    portal.add_parser("list", help="list portals")
    create = portal.add_parser("create", help="listen on an address (for every target, or some)")
    create.add_argument("address")
    create.add_argument("--port", type=int, default=ISCSI_DEFAULT_PORT)
    create.add_argument("--target", action="append", default=[], help="serve only this target (repeatable)")
    delete = portal.add_parser("delete", help="stop listening on an address")
    delete.add_argument("address")
    delete.add_argument("--port", type=int, default=ISCSI_DEFAULT_PORT)

    lun = groups.add_parser("lun", help="LUN mappings").add_subparsers(dest="action", required=True)
    listing = lun.add_parser("list", help="list LUNs")
    listing.add_argument("target", nargs="?")
    add = lun.add_parser("add", help="export a disk as a LUN of a target")
    add.add_argument("target")
    add.add_argument("disk")
    add.add_argument("--lun", type=int, help="LUN number (default: lowest free)")
    add.add_argument("--read-only", action="store_true", help="initiators may read but not write")
    remove = lun.add_parser("remove", help="remove a LUN from a target")
    remove.add_argument("target")
    remove.add_argument("lun", type=int)
    remove.add_argument("--force", action="store_true", help="even if initiators are logged in")

    acl = groups.add_parser("acl", help="initiators allowed on a target").add_subparsers(dest="action", required=True)
    listing = acl.add_parser("list", help="list ACLs")
    listing.add_argument("target", nargs="?")
    add = acl.add_parser("add", help="allow an initiator IQN")
    add.add_argument("target")
    add.add_argument("initiator")
    remove = acl.add_parser("remove", help="remove an initiator from a target")
    remove.add_argument("target")
    remove.add_argument("initiator")
    remove.add_argument("--force", action="store_true", help="even if it is logged in")
    initiator = groups.add_parser("initiator", help="initiators seen by this node").add_subparsers(
        dest="action", required=True
    )
    initiator.add_parser("seen", help="logins and refused logins of the last 7 days, newest first")
    boot = groups.add_parser("boot", help="iSCSI boot profiles and their DHCP settings").add_subparsers(
        dest="action", required=True
    )
    boot.add_parser("list", help="list boot profiles")
    create = boot.add_parser("create", help="make a boot profile for a client")
    create.add_argument("name")
    create.add_argument("target")
    create.add_argument("initiator", help="the client's initiator IQN (it needs an ACL on the target)")
    create.add_argument("--lun", type=int, default=0, help="boot LUN (default 0; 255 is refused)")
    create.add_argument("--mac", default="", help="the client's MAC, to bind its DHCP entry")
    create.add_argument("--portal", default="", help="ADDRESS[:PORT] the firmware connects to (default: a portal)")
    create.add_argument("--secondary-portal", default="", help="ADDRESS[:PORT] of the second target (standby node)")
    create.add_argument(
        "--firmware",
        choices=["all", "ipxe", "uefi", "broadcom"],
        default="all",
        help="serve only this boot firmware family (default: all; uefi needs --mac)",
    )
    show = boot.add_parser("show", help="print the DHCP settings of a boot profile")
    show.add_argument("name")
    show.add_argument("--format", choices=["root-path", "isc-dhcpd", "kea", "dnsmasq"], help="only this one")
    show.add_argument("--secrets", action="store_true", help="include the CHAP credentials iPXE reads (root only)")
    delete = boot.add_parser("delete", help="delete a boot profile")
    delete.add_argument("name")

    config = groups.add_parser("config", help="the whole configuration").add_subparsers(dest="action", required=True)
    export = config.add_parser("export", help="write the configuration as JSON (it contains CHAP secrets)")
    export.add_argument("--output", "-o", help="file to write (mode 0600); default: standard output")
    imported = config.add_parser("import", help="replace the configuration with an export")
    imported.add_argument("file")
    imported.add_argument("--force", action="store_true", help="even if it removes targets in use")
    targetcli = config.add_parser("import-targetcli", help="add what a targetcli saveconfig.json describes")
    targetcli.add_argument("file", nargs="?", default="/etc/target/saveconfig.json")

    chap = groups.add_parser(
        "chap",
        help="CHAP authentication (secrets are read from standard input or a prompt, never from arguments)",
    ).add_subparsers(dest="action", required=True)
    for scope, help_text in (
        ("target", "CHAP for every initiator of a target"),
        ("acl", "CHAP for one initiator of a target (overrides the target's)"),
        ("discovery", "CHAP for SendTargets discovery"),
    ):
        sub = chap.add_parser(scope, help=help_text)
        if scope in ("target", "acl"):
            sub.add_argument("target")
        if scope == "acl":
            sub.add_argument("initiator")
        sub.add_argument("--user", default="", help="CHAP user (default: the initiator's IQN)")
        sub.add_argument("--mutual", action="store_true", help="also authenticate the target (mutual CHAP)")
        sub.add_argument("--mutual-user", default="", help="user of the target (default: the target's IQN)")
        sub.add_argument("--off", action="store_true", help="turn CHAP off")

    pair = groups.add_parser(
        "pair", help="the pair of nodes (the key is read from a file, standard input or a prompt, never from arguments)"
    ).add_subparsers(dest="action", required=True)
    create = pair.add_parser("create", help="pair with the node at PEER_ADDRESS (run it on both nodes, same key)")
    create.add_argument("peer_address", help="the peer's address on the replication/heartbeat network")
    create.add_argument("--aux-address", default="", help="the peer's second address: an auxiliary path")
    create.add_argument("--port", type=int, default=PEER_DEFAULT_PORT, help=f"UDP port (default {PEER_DEFAULT_PORT})")
    create.add_argument(
        "--local-address", action="append", default=[], help="use only this address of this node (repeatable)"
    )
    create.add_argument("--key-file", help="file holding the shared key (at least 32 bytes)")
    pair.add_parser("status", help="the peer link: connected, paths, round trip, clock offset, dropped datagrams")
    pair.add_parser("delete", help="unpair this node (do it on both nodes)")

    mirror = groups.add_parser("mirror", help="disks replicated to the peer node").add_subparsers(
        dest="action", required=True
    )
    mirror.add_parser("list", help="list mirrors, their roles and states")
    create = mirror.add_parser("create", help="mirror a disk to the peer node (its copy is made there)")
    create.add_argument("disk")
    create.add_argument("mode", choices=["sync", "async"], help="sync: a write completes on both nodes")
    create.add_argument("--peer-disk", default="", help="take this existing disk of the peer as the copy")
    create.add_argument("--skip-initial-sync", action="store_true", help="both disks are blank: copy nothing now")
    create.add_argument("--region", default="64K", help="bytes per bitmap bit (default 64K)")
    for action, text in (
        ("show", "a mirror's settings and counters"),
        ("state", "the mirror's state as a bare number (0 none, 1 mirroring, ... 5 resync pending)"),
        ("continue", "resume a paused or broken mirror (partial resync; full after a break)"),
        ("break", "stop replicating; the next resync is full"),
        ("resync", "copy the whole disk to the peer again"),
        ("prepare-target", "after a split brain, on the node whose changes are to be overwritten"),
        ("wait", "wait until the mirror is mirroring, with a progress bar while it resyncs"),
    ):
        sub = mirror.add_parser(action, help=text)
        sub.add_argument("disk")
    pause = mirror.add_parser("pause", help="stop replicating; every write is tracked (partial resync later)")
    pause.add_argument("disk")
    pause.add_argument("--unlock", action="store_true", help="also show the copy read-only on the peer (backups)")
    delete = mirror.add_parser("delete", help="take the mirror apart; both halves become plain disks, data kept")
    delete.add_argument("disk")
    delete.add_argument("--local-only", action="store_true", help="release this node's half alone (peer gone)")
    switchover = mirror.add_parser("switchover", help="make the copy the source (only while mirroring)")
    switchover.add_argument("disk")
    switchover.add_argument(
        "--force", action="store_true", help="on the source: though initiators use it; on the copy: take over alone"
    )
    mode = mirror.add_parser("mode", help="switch between sync and async while the mirror runs")
    mode.add_argument("disk")
    mode.add_argument("mode", choices=["sync", "async"])
    endpoints = mirror.add_parser("endpoints", help="move the mirror's traffic to other addresses (partial resync)")
    endpoints.add_argument("disk")
    endpoints.add_argument("source_address", help="this node's address")
    endpoints.add_argument("target_address", help="the peer's address")
    grow = mirror.add_parser("grow", help="grow both halves of a mirrored disk file (partial resync)")
    grow.add_argument("disk")
    grow.add_argument("size", help="new size with a unit, e.g. 200G")
    tune = mirror.add_parser("tune", help="change settings that apply live")
    tune.add_argument("disk")
    tune.add_argument("--high-water", type=int, help="async: queued writes before the mirror pauses")
    tune.add_argument("--low-water", type=int, help="async: queue length the reference drains to")
    tune.add_argument("--throttle", type=int, help="Kbit/s for the mirror's resync traffic (0: unlimited)")
    tune.add_argument("--max-resync-passes", type=int, help="resyncs in a row before the mirror pauses")
    wait = mirror.choices["wait"]
    wait.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")

    failover = groups.add_parser(
        "failover", help="active/passive failover of the pair: virtual IPs, ping nodes, protected targets"
    ).add_subparsers(dest="action", required=True)
    failover.add_parser("status", help="this node's role, the last decision and why, what it hears")
    failover.add_parser("history", help="the role changes, with their reasons and the duration of each step")
    failover.add_parser("check", help="what keeps failover from starting with this node active")
    failover.add_parser("start", help="start the cluster with this node active (its settings go to the peer)")
    failover.add_parser("stop", help="stop failover on both nodes (the active node keeps serving)")
    failover.add_parser("switchover", help="hand the service over to the peer (planned failover, failback)")
    take_over = failover.add_parser("take-over", help="on the passive node: allow a takeover with a stale copy")
    take_over.add_argument("--force", action="store_true", required=True, help="accept serving older data")
    for verb, text in (("add", "a virtual IP: clients reach the protected targets there"), ("remove", "a virtual IP")):
        sub = failover.add_parser(f"{verb}-address", help=f"{verb} {text}")
        sub.add_argument("interface", help="the data NIC that carries it")
        sub.add_argument("address", help="address with its prefix length, e.g. 10.0.0.10/24 or fd00::10/64")
    sub = failover.add_parser("add-ping-node", help="a host on the data network that answers ping")
    sub.add_argument("address")
    sub.add_argument("interface", help="the data NIC to reach it over")
    sub = failover.add_parser("remove-ping-node", help="stop using a ping node")
    sub.add_argument("address")
    for verb, text in (("protect", "serve a target from the active node"), ("unprotect", "stop protecting a target")):
        failover.add_parser(verb, help=text).add_argument("target")
    heartbeat = failover.add_parser("heartbeat", help="how often the nodes beat, and how many misses mean silence")
    heartbeat.add_argument("interval", type=float, help="seconds between beats (0.1-10)")
    heartbeat.add_argument("misses", type=int, help="beats missed in a row before the peer counts as silent (2-30)")

    batch = groups.add_parser(
        "batch", help="run commands from FILE (default: standard input), one per line, over one connection"
    )
    batch.add_argument("file", nargs="?", default="-", help="one command per line as typed after 'appliancectl'")
    return parser


def read_secrets(mutual: bool) -> tuple[str, str]:
    """The CHAP secret (and the mutual one): prompted on a terminal, else one per stdin line."""
    if sys.stdin.isatty():
        secret = getpass.getpass("CHAP secret: ")
        return secret, getpass.getpass("mutual CHAP secret: ") if mutual else ""
    lines = sys.stdin.read().splitlines()
    if len(lines) < (2 if mutual else 1):
        raise UsageError("invalid argument: expected the secret(s) on standard input, one per line", EXIT_INVALID)
    return lines[0], lines[1] if mutual else ""


def read_key(key_file: str | None) -> bytes:
    """The shared key: a regular file's bytes, else standard input or a prompt; one final newline is dropped."""
    if key_file:
        try:
            fd = os.open(key_file, os.O_PATH)
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
            finally:
                os.close(fd)
            if not regular:
                raise UsageError(f"invalid argument: {key_file} is not a regular file", EXIT_INVALID)
            key = Path(key_file).read_bytes()
        except OSError as exc:
            raise UsageError(f"invalid argument: cannot read {key_file}: {exc.strerror}", EXIT_INVALID) from None
    elif sys.stdin.isatty():
        key = getpass.getpass("pair key: ").encode()
    else:
        key = sys.stdin.buffer.read()
    return key.removesuffix(b"\n")


class Commands:
    """One method per command; each returns rows (list of dicts) to print, or None."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._objects: dict[str, dict[str, dict[str, Any]]] | None = None

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        if self._objects is None:
            self._objects = await self.client.objects()
        return self._objects

    async def of(self, interface: str) -> list[tuple[str, dict[str, Any]]]:
        return sorted(
            ((path, ifaces[interface]) for path, ifaces in (await self.objects()).items() if interface in ifaces),
            key=lambda item: item[0],
        )

    async def find(self, interface: str, kind: str, **match: Any) -> str:
        for path, props in await self.of(interface):
            if all(props.get(key) == value for key, value in match.items()):
                return path
        what = " ".join(str(v) for v in match.values())
        raise UsageError(f"not found: {kind} {what!r} does not exist", EXIT_NOT_FOUND)

    async def name_of(self, path: str, interface: str, prop: str = "Name") -> str:
        return (await self.objects()).get(path, {}).get(interface, {}).get(prop, path)

    # -- status ------------------------------------------------------------------------

    async def status(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        manager = await self.client.properties(ROOT_PATH, MANAGER_INTERFACE)
        return [
            {
                "version": manager["Version"],
                "node_id": manager["NodeId"],
                "disks": len(await self.of(DISK_INTERFACE)),
                "targets": len(await self.of(TARGET_INTERFACE)),
                "portals": len(await self.of(PORTAL_INTERFACE)),
            }
        ]

    # -- disks -------------------------------------------------------------------------

    async def disk_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        return [
            {
                "name": p["Name"],
                "kind": p["Kind"],
                "status": p["Status"],
                "size": p["Size"],
                "path": p["Path"],
                "serial": p["Serial"],
                "shared": p["Shared"],
                "backstore": p["Backstore"],
                "description": p["Description"],
                "reason": p["StatusReason"],
            }
            for _, p in await self.of(DISK_INTERFACE)
        ]

    async def disk_create(self, args: argparse.Namespace) -> None:
        options = {
            "path": Variant("s", args.path),
            "description": Variant("s", args.description),
            "write_back": Variant("b", args.write_back),
        }
        size = _size(args.size)
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "CreateDisk", "sta{sv}", [args.name, size, options])
        if args.write_back:
            print(
                f"appliancectl: warning: {args.name} caches writes in memory; a power cut or crash of this node "
                "loses writes that initiators were told are done",
                file=sys.stderr,
            )

    async def disk_create_block(self, args: argparse.Namespace) -> None:
        options = {"description": Variant("s", args.description)}
        body = [args.name, args.device, options]
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "CreateBlockDisk", "ssa{sv}", body)

    async def disk_import(self, args: argparse.Namespace) -> None:
        options = {"name": Variant("s", args.name), "description": Variant("s", args.description)}
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "ImportDisk", "sa{sv}", [args.path, options])

    async def disk_extend(self, args: argparse.Namespace) -> None:
        path = await self.find(DISK_INTERFACE, "disk", Name=args.name)
        await self.client.call(path, DISK_INTERFACE, "Extend", "ta{sv}", [_size(args.size), {}])

    async def disk_modify(self, args: argparse.Namespace) -> None:
        path = await self.find(DISK_INTERFACE, "disk", Name=args.name)
        changes = {}
        if args.description is not None:
            changes["description"] = Variant("s", args.description)
        if args.shared is not None:
            changes["shared"] = Variant("b", args.shared)
        if args.backstore is not None:
            changes["backstore"] = Variant("s", args.backstore)
        options = {"force": Variant("b", args.force)}
        await self.client.call(path, DISK_INTERFACE, "Modify", "a{sv}a{sv}", [changes, options])

    async def disk_delete(self, args: argparse.Namespace) -> None:
        path = await self.find(DISK_INTERFACE, "disk", Name=args.name)
        await self.client.call(
            path, DISK_INTERFACE, "Delete", "a{sv}", [{"remove_file": Variant("b", args.remove_file)}]
        )

    # -- targets -----------------------------------------------------------------------

    async def target_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        luns = await self.of(LUN_INTERFACE)
        acls = await self.of(ACL_INTERFACE)
        return [
            {
                "name": p["Name"],
                "iqn": p["Iqn"],
                "alias": p["Alias"],
                "enabled": p["Enabled"],
                "status": f"logged in ({p['SessionCount']})" if p["SessionCount"] else "idle",
                "auth": p["Authentication"],
                "luns": sum(1 for _, lun in luns if lun["Target"] == path),
                "acls": sum(1 for _, acl in acls if acl["Target"] == path),
                "sources": p["AllowedSources"],
                "description": p["Description"],
            }
            for path, p in await self.of(TARGET_INTERFACE)
        ]

    async def target_create(self, args: argparse.Namespace) -> None:
        options = {
            "iqn": Variant("s", args.iqn),
            "description": Variant("s", args.description),
            "alias": Variant("s", args.alias),
        }
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "CreateTarget", "sa{sv}", [args.name, options])

    async def target_modify(self, args: argparse.Namespace) -> None:
        path = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        changes = {
            key: Variant(signature, value)
            for key, signature, value in (
                ("description", "s", args.description),
                ("alias", "s", args.alias),
                ("iqn", "s", args.iqn),
                ("enabled", "b", args.enabled),
                ("header_digest", "s", args.header_digest),
                ("data_digest", "s", args.data_digest),
            )
            if value is not None
        }
        if not changes:
            raise UsageError(
                "invalid argument: nothing to change (see appliancectl target modify --help)", EXIT_INVALID
            )
        options = {"force": Variant("b", args.force)}
        await self.client.call(path, TARGET_INTERFACE, "Modify", "a{sv}a{sv}", [changes, options])

    async def target_delete(self, args: argparse.Namespace) -> None:
        path = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        await self.client.call(path, TARGET_INTERFACE, "Delete", "a{sv}", [{"force": Variant("b", args.force)}])

    async def target_allow(self, args: argparse.Namespace) -> None:
        if bool(args.sources) == args.clear:
            raise UsageError("invalid argument: give the allowed sources, or --clear to admit any source", EXIT_INVALID)
        path = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        options = {"force": Variant("b", args.force)}
        await self.client.call(path, TARGET_INTERFACE, "SetAllowedSources", "asa{sv}", [args.sources, options])

    async def target_sessions(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        path = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        sessions = (await self.client.properties(path, TARGET_INTERFACE))["Sessions"]
        return [
            {
                "initiator": s["Initiator"],
                "state": s["State"],
                "addresses": ",".join(s["Addresses"]),
                "portals": ",".join(s["Portals"]),
                "authentication": s["Authentication"],
                "luns": ",".join(str(n) for n in s["Luns"]),
                "isid": s["Isid"],
                # Unknown ("-") when LIO's debug messages are off or the login predates them.
                "header-digest": s["Negotiated"].get("HeaderDigest", "-"),
                "data-digest": s["Negotiated"].get("DataDigest", "-"),
                **({"negotiated": dict(s["Negotiated"])} if args.json else {}),
            }
            for s in sessions
        ]

    async def target_connections(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        path = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        connections = (await self.client.properties(path, TARGET_INTERFACE))["Connections"]
        return [
            {"initiator address": f"{a}:{p}" if ":" not in a else f"[{a}]:{p}", "portal": portal}
            for a, p, portal in connections
        ]

    # -- whole configuration -----------------------------------------------------------

    async def config_export(self, args: argparse.Namespace) -> None:
        (document,) = await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "ExportConfiguration", "a{sv}", [{}])
        if not args.output:
            print(document)
            return
        # Created private: the export carries CHAP secrets.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as output:
            output.write(document + "\n")

    async def config_import(self, args: argparse.Namespace) -> None:
        document = _read_document(args.file)
        options = {"force": Variant("b", args.force)}
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "ImportConfiguration", "sa{sv}", [document, options])

    async def config_import_targetcli(self, args: argparse.Namespace) -> None:
        document = _read_document(args.file)
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "ImportTargetcli", "sa{sv}", [document, {}])

    # -- boot profiles -----------------------------------------------------------------

    async def boot_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        return [
            {
                "name": p["Name"],
                "target": await self.name_of(p["Target"], TARGET_INTERFACE),
                "initiator": p["Initiator"],
                "lun": p["Lun"],
                "firmware": p["Firmware"],
                "root_path": p["RootPath"],
            }
            for _, p in await self.of(BOOT_PROFILE_INTERFACE)
        ]

    async def boot_create(self, args: argparse.Namespace) -> None:
        if not 0 <= args.lun <= 255:
            raise UsageError(f"invalid argument: LUN {args.lun} is out of range 0-254", EXIT_INVALID)
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        options = {"lun": Variant("u", args.lun), "firmware": Variant("s", args.firmware)}
        for key, value in (("mac", args.mac), ("portal", args.portal), ("secondary_portal", args.secondary_portal)):
            if value:
                options[key] = Variant("s", value)
        await self.client.call(
            ROOT_PATH, MANAGER_INTERFACE, "CreateBootProfile", "sosa{sv}", [args.name, target, args.initiator, options]
        )

    async def boot_show(self, args: argparse.Namespace) -> None:
        path = await self.find(BOOT_PROFILE_INTERFACE, "boot profile", Name=args.name)
        if args.secrets:
            (configs,) = await self.client.call(path, BOOT_PROFILE_INTERFACE, "DhcpConfigsWithSecrets", "a{sv}", [{}])
        else:
            configs = (await self.client.properties(path, BOOT_PROFILE_INTERFACE))["DhcpConfigs"]
        if args.format and args.format not in configs:
            raise UsageError(f"not supported: {args.format} cannot carry this profile's IPv6 portal", EXIT_INVALID)
        if args.json:
            print(json.dumps(configs if not args.format else {args.format: configs[args.format]}, indent=2))
        elif args.format:
            print(configs[args.format])
        else:
            for name, text in configs.items():
                print(f"# --- {name} ---\n{text.rstrip()}\n")

    async def boot_delete(self, args: argparse.Namespace) -> None:
        path = await self.find(BOOT_PROFILE_INTERFACE, "boot profile", Name=args.name)
        await self.client.call(path, BOOT_PROFILE_INTERFACE, "Delete", "a{sv}", [{}])

    # -- CHAP --------------------------------------------------------------------------

    async def _set_chap(self, args: argparse.Namespace, path: str, interface: str, method: str) -> None:
        credentials: dict[str, Variant] = {}
        if not args.off:
            secret, mutual_secret = read_secrets(args.mutual)
            credentials = {"user": Variant("s", args.user), "secret": Variant("s", secret)}
            if args.mutual:
                credentials["mutual_user"] = Variant("s", args.mutual_user)
                credentials["mutual_secret"] = Variant("s", mutual_secret)
        await self.client.call(path, interface, method, "a{sv}a{sv}", [credentials, {}])

    async def chap_target(self, args: argparse.Namespace) -> None:
        path = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        await self._set_chap(args, path, TARGET_INTERFACE, "SetChap")

    async def chap_acl(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        path = await self.find(ACL_INTERFACE, "ACL", Target=target, Initiator=args.initiator.strip().lower())
        await self._set_chap(args, path, ACL_INTERFACE, "SetChap")

    async def chap_discovery(self, args: argparse.Namespace) -> None:
        await self._set_chap(args, ROOT_PATH, MANAGER_INTERFACE, "SetDiscoveryChap")

    async def target_logout(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.name)
        path = await self.find(ACL_INTERFACE, "ACL", Target=target, Initiator=args.initiator.strip().lower())
        await self.client.call(path, ACL_INTERFACE, "Logout", "a{sv}", [{}])

    # -- the pair ----------------------------------------------------------------------

    async def pair_create(self, args: argparse.Namespace) -> None:
        if not 0 < args.port < 65536:
            raise UsageError(f"invalid argument: port {args.port} is out of range 1-65535", EXIT_INVALID)
        options = {
            "aux_address": Variant("s", args.aux_address),
            "port": Variant("q", args.port),
            "local_addresses": Variant("as", args.local_address),
        }
        key = read_key(args.key_file)
        await self.client.call(
            ROOT_PATH, MANAGER_INTERFACE, "CreatePair", "saya{sv}", [args.peer_address, key, options]
        )

    async def _peer_path(self) -> str:
        if PEER_PATH not in await self.objects():
            raise UsageError("not found: this node is not paired", EXIT_NOT_FOUND)
        return PEER_PATH

    async def pair_status(self, args: argparse.Namespace) -> None:
        p = await self.client.properties(await self._peer_path(), PEER_INTERFACE)
        status = {
            "peer_address": p["PeerAddress"],
            "aux_address": p["AuxAddress"],
            "port": p["Port"],
            "local_addresses": p["LocalAddresses"],
            "peer_node_id": p["PeerNodeId"],
            "connected": p["Connected"],
            "session_started": p["SessionStarted"] or None,
            "paths": [
                {
                    "address": address,
                    "role": role,
                    "up": up,
                    "rtt": None if rtt < 0 else rtt,
                    "last_received": last or None,
                }
                for address, role, up, rtt, last in p["Paths"]
            ],
            "last_message": p["LastMessage"] or None,
            "last_message_kind": p["LastMessageKind"],
            "clock_offset": p["ClockOffset"] if p["ClockOffsetKnown"] else None,
            "drops": p["Drops"],
        }
        offset = status["clock_offset"]
        if offset is not None and abs(offset) > CLOCK_OFFSET_WARNING:
            print(
                f"appliancectl: warning: the nodes' clocks differ by {offset:+.3f} s; "
                "keep them synchronised (NTP) on both nodes",
                file=sys.stderr,
            )
        print(json.dumps(status, indent=2) if args.json else _pair_text(status))

    async def pair_delete(self, args: argparse.Namespace) -> None:
        await self.client.call(await self._peer_path(), PEER_INTERFACE, "Delete", "a{sv}", [{}])

    # -- failover ---------------------------------------------------------------------

    async def _failover(self, method: str, signature: str = "a{sv}", *arguments: Any) -> Any:
        return await self.client.call(FAILOVER_PATH, FAILOVER_INTERFACE, method, signature, [*arguments, {}])

    async def failover_status(self, args: argparse.Namespace) -> None:
        p = await self.client.properties(FAILOVER_PATH, FAILOVER_INTERFACE)
        status = {
            "role": p["Role"],
            "active_since": p["ActiveSince"] or None,
            "decision": p["Decision"],
            "reason": p["Reason"],
            "peer_heard": p["PeerHeard"],
            "ping_node_reached": p["PingNodeReached"],
            "client_connections": p["ClientConnections"],
            "addresses": [f"{address}/{length} on {interface}" for interface, address, length in p["Addresses"]],
            "ping_nodes": [f"{address} over {interface}" for address, interface in p["PingNodes"]],
            "targets": p["Targets"],
            "heartbeat": {"interval": p["HeartbeatInterval"], "misses": p["HeartbeatMisses"]},
            "counters": p["Counters"],
        }
        if args.json:
            print(json.dumps(status, indent=2))
            return
        since = status["active_since"]
        lines = [
            ("role", p["Role"] + (f" (last active {_local_time(int(since))})" if since else "")),
            ("decision", f"{p['Decision']}: {p['Reason']}"),
            ("peer heard", "yes" if p["PeerHeard"] else "no"),
            ("ping node", "reached" if p["PingNodeReached"] else "not reached"),
            ("clients", f"{p['ClientConnections']} connections to the virtual IPs"),
            ("addresses", ", ".join(status["addresses"]) or "none"),
            ("ping nodes", ", ".join(status["ping_nodes"]) or "none"),
            ("targets", ", ".join(p["Targets"]) or "none"),
            ("heartbeat", f"every {p['HeartbeatInterval']:g} s, silent after {p['HeartbeatMisses']} missed"),
        ]
        print("\n".join(f"{label + ':':<12}{value}" for label, value in lines))

    async def failover_history(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        p = await self.client.properties(FAILOVER_PATH, FAILOVER_INTERFACE)
        return [
            {
                "time": _local_time(int(when)),
                "role": role,
                "reason": reason,
                "steps": ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in steps) or "-",
            }
            for when, role, reason, steps in p["History"]
        ]

    async def failover_check(self, args: argparse.Namespace) -> None:
        (problems,) = await self._failover("Check")
        if args.json:
            print(json.dumps(problems, indent=2))
        else:
            print("\n".join(problems) if problems else "ready: failover can start with this node active")

    async def failover_start(self, args: argparse.Namespace) -> None:
        await self._failover("Start")

    async def failover_stop(self, args: argparse.Namespace) -> None:
        await self._failover("Stop")

    async def failover_switchover(self, args: argparse.Namespace) -> None:
        await self._failover("Switchover")

    async def failover_take_over(self, args: argparse.Namespace) -> None:
        await self.client.call(FAILOVER_PATH, FAILOVER_INTERFACE, "TakeOver", "a{sv}", [{"force": Variant("b", True)}])

    async def failover_add_address(self, args: argparse.Namespace) -> None:
        await self._failover("AddAddress", "ssa{sv}", args.interface, args.address)

    async def failover_remove_address(self, args: argparse.Namespace) -> None:
        await self._failover("RemoveAddress", "ssa{sv}", args.interface, args.address)

    async def failover_add_ping_node(self, args: argparse.Namespace) -> None:
        await self._failover("AddPingNode", "ssa{sv}", args.address, args.interface)

    async def failover_remove_ping_node(self, args: argparse.Namespace) -> None:
        await self._failover("RemovePingNode", "sa{sv}", args.address)

    async def failover_protect(self, args: argparse.Namespace) -> None:
        await self._failover("Protect", "sa{sv}", args.target)

    async def failover_unprotect(self, args: argparse.Namespace) -> None:
        await self._failover("Unprotect", "sa{sv}", args.target)

    async def failover_heartbeat(self, args: argparse.Namespace) -> None:
        if args.misses < 0:
            raise UsageError(f"invalid argument: {args.misses} misses is negative", EXIT_INVALID)
        await self._failover("SetHeartbeat", "dua{sv}", args.interval, args.misses)

    # -- mirrors -----------------------------------------------------------------------

    async def _mirror_path(self, disk: str) -> str:
        path = await self.find(DISK_INTERFACE, "disk", Name=disk)
        for mirror, p in await self.of(MIRROR_INTERFACE):
            if p["Disk"] == path:
                return mirror
        raise UsageError(f"not found: disk {disk!r} is not mirrored", EXIT_NOT_FOUND)

    async def mirror_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        disks = {path: p["Name"] for path, p in await self.of(DISK_INTERFACE)}
        return [
            {
                "disk": disks.get(p["Disk"], p["Disk"]),
                "role": p["Role"],
                "mode": p["Mode"],
                "state": f"{p['State']} {p['StateName']}",
                "peer": p["PeerAddress"],
                "reason": p["Reason"],
            }
            for _, p in await self.of(MIRROR_INTERFACE)
        ]

    async def mirror_create(self, args: argparse.Namespace) -> None:
        disk = await self.find(DISK_INTERFACE, "disk", Name=args.disk)
        options = {
            "peer_disk": Variant("s", args.peer_disk),
            "skip_initial_sync": Variant("b", args.skip_initial_sync),
            "region": Variant("u", _size(args.region)),
        }
        await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "CreateMirror", "osa{sv}", [disk, args.mode, options])

    async def mirror_show(self, args: argparse.Namespace) -> None:
        path = await self._mirror_path(args.disk)
        p = await self.client.properties(path, MIRROR_INTERFACE)
        shown = {
            "disk": args.disk,
            "role": p["Role"],
            "mode": p["Mode"],
            "state": p["State"],
            "state_name": p["StateName"],
            "reason": p["Reason"],
            "source_address": p["SourceAddress"],
            "target_address": p["TargetAddress"],
            "port": p["Port"],
            "size": p["Size"],
            "region": p["Region"],
            "split_brain": p["SplitBrain"],
            "unlocked": p["Unlocked"],
            "generation": dict(zip(("current", "bitmap", "history"), p["Generation"], strict=True)),
            "tunables": p["Tunables"],
            "counters": p["Counters"],
        }
        if args.json:
            print(json.dumps(shown, indent=2))
            return
        for key, value in shown.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for name, item in value.items():
                    print(f"  {name}: {item}")
            else:
                print(f"{key}: {format_size(value) if key == 'size' else _cell(key, value)}")

    async def mirror_state(self, args: argparse.Namespace) -> None:
        (state,) = await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "GetVolumeState", "sa{sv}", [args.disk, {}])
        print(state)

    async def _mirror_call(self, disk: str, method: str, signature: str = "a{sv}", body: list | None = None) -> list:
        path = await self._mirror_path(disk)
        return await self.client.call(path, MIRROR_INTERFACE, method, signature, body if body is not None else [{}])

    async def mirror_pause(self, args: argparse.Namespace) -> None:
        (node,) = await self._mirror_call(args.disk, "Pause", body=[{"unlock": Variant("b", args.unlock)}])
        if node:
            print(f"the copy is readable on the peer at {node} (read-only; mount with -o ro,noload)")

    async def mirror_continue(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Continue")

    async def mirror_break(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Break")

    async def mirror_resync(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Resync")

    async def mirror_delete(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Delete", body=[{"local_only": Variant("b", args.local_only)}])

    async def mirror_switchover(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Switchover", body=[{"force": Variant("b", args.force)}])

    async def mirror_prepare_target(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "PrepareTarget")

    async def mirror_mode(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "SetMode", "sa{sv}", [args.mode, {}])

    async def mirror_endpoints(self, args: argparse.Namespace) -> None:
        body = [args.source_address, args.target_address, {}]
        await self._mirror_call(args.disk, "SetEndpoints", "ssa{sv}", body)

    async def mirror_grow(self, args: argparse.Namespace) -> None:
        await self._mirror_call(args.disk, "Grow", "ta{sv}", [_size(args.size), {}])

    async def mirror_tune(self, args: argparse.Namespace) -> None:
        names = ("high_water", "low_water", "throttle", "max_resync_passes")
        settings = {name: Variant("u", getattr(args, name)) for name in names if getattr(args, name) is not None}
        if not settings:
            raise UsageError("invalid argument: name at least one setting to change", EXIT_INVALID)
        for name, value in settings.items():
            if not 0 <= value.value < 2**32:
                raise UsageError(
                    f"invalid argument: {name.replace('_', ' ')} {value.value} is out of range", EXIT_INVALID
                )
        await self._mirror_call(args.disk, "Tune", "a{sv}a{sv}", [settings, {}])

    async def mirror_wait(self, args: argparse.Namespace) -> None:
        """Until the mirror is mirroring: a bar on a terminal, a line every 10 s otherwise."""
        path = await self._mirror_path(args.disk)
        started = time.monotonic()
        last_line = 0.0
        bar = sys.stdout.isatty()
        while True:
            p = await self.client.properties(path, MIRROR_INTERFACE)
            if p["State"] == 1:
                if bar:
                    print()
                print(f"{args.disk}: mirroring")
                return
            if p["Intent"] != "mirror" or p["SplitBrain"]:
                # Nothing will bring it back by itself.
                raise UsageError(f"busy: {args.disk} is {p['StateName']}: {p['Reason'] or p['Intent']}", 6)
            line = f"{args.disk}: {p['StateName']}"
            if p["Job"] != "/":
                job = await self.client.properties(p["Job"], JOB_INTERFACE)
                eta = f", {job['Eta']:.0f} s left" if job["Eta"] >= 0 else ""
                line = (
                    f"{args.disk}: resync {job['Progress'] * 100:5.1f}% "
                    f"({format_size(job['BytesDone'])} of {format_size(job['BytesTotal'])}, "
                    f"{format_size(job['Rate'])}/s{eta})"
                )
                if bar:
                    filled = int(job["Progress"] * 30)
                    line = f"[{'#' * filled}{'.' * (30 - filled)}] {line}"
            now = time.monotonic()
            if bar:
                print(f"\r{line:<100}", end="", flush=True)
            elif now - last_line >= 10:
                print(line, flush=True)
                last_line = now
            if args.timeout and now - started > args.timeout:
                raise UsageError(f"busy: {args.disk} is not mirroring after {args.timeout:g} s", 6)
            # Blocking is right here: the command has nothing else to do meanwhile.
            time.sleep(1)

    # -- portals -----------------------------------------------------------------------

    async def portal_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        return [
            {
                "address": p["Address"],
                "port": p["Port"],
                "targets": ",".join([await self.name_of(t, TARGET_INTERFACE) for t in p["Targets"]]) or "(all)",
            }
            for _, p in await self.of(PORTAL_INTERFACE)
        ]

    async def portal_create(self, args: argparse.Namespace) -> None:
        if not 0 < args.port < 65536:
            raise UsageError(f"invalid argument: port {args.port} is out of range 1-65535", EXIT_INVALID)
        options = {}
        if args.target:
            targets = [await self.find(TARGET_INTERFACE, "target", Name=name) for name in args.target]
            options["targets"] = Variant("ao", targets)
        await self.client.call(
            ROOT_PATH, MANAGER_INTERFACE, "CreatePortal", "sqa{sv}", [args.address, args.port, options]
        )

    async def portal_delete(self, args: argparse.Namespace) -> None:
        address = args.address.strip("[]")
        path = await self.find(PORTAL_INTERFACE, "portal", Address=address, Port=args.port)
        await self.client.call(path, PORTAL_INTERFACE, "Delete", "a{sv}", [{}])

    # -- LUNs --------------------------------------------------------------------------

    async def lun_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        only = await self.find(TARGET_INTERFACE, "target", Name=args.target) if args.target else None
        return [
            {
                "target": await self.name_of(p["Target"], TARGET_INTERFACE),
                "lun": p["Number"],
                "disk": await self.name_of(p["Disk"], DISK_INTERFACE),
                "read_only": p["ReadOnly"],
            }
            for _, p in await self.of(LUN_INTERFACE)
            if only in (None, p["Target"])
        ]

    async def lun_add(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        disk = await self.find(DISK_INTERFACE, "disk", Name=args.disk)
        if args.lun is not None and args.lun < 0:
            raise UsageError(f"invalid argument: LUN {args.lun} is negative", EXIT_INVALID)
        options = {"read_only": Variant("b", args.read_only)}
        if args.lun is not None:
            options["lun"] = Variant("u", args.lun)
        await self.client.call(target, TARGET_INTERFACE, "AddLun", "oa{sv}", [disk, options])

    async def lun_remove(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        path = await self.find(LUN_INTERFACE, "LUN", Target=target, Number=args.lun)
        await self.client.call(path, LUN_INTERFACE, "Delete", "a{sv}", [{"force": Variant("b", args.force)}])

    # -- ACLs --------------------------------------------------------------------------

    async def acl_list(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        only = await self.find(TARGET_INTERFACE, "target", Name=args.target) if args.target else None
        return [
            {
                "target": await self.name_of(p["Target"], TARGET_INTERFACE),
                "initiator": p["Initiator"],
                "auth": p["Authentication"],
            }
            for _, p in await self.of(ACL_INTERFACE)
            if only in (None, p["Target"])
        ]

    async def acl_add(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        await self.client.call(target, TARGET_INTERFACE, "AddAcl", "sa{sv}", [args.initiator, {}])

    async def acl_remove(self, args: argparse.Namespace) -> None:
        target = await self.find(TARGET_INTERFACE, "target", Name=args.target)
        path = await self.find(ACL_INTERFACE, "ACL", Target=target, Initiator=args.initiator.strip().lower())
        await self.client.call(path, ACL_INTERFACE, "Delete", "a{sv}", [{"force": Variant("b", args.force)}])

    # -- initiators --------------------------------------------------------------------

    async def initiator_seen(self, args: argparse.Namespace) -> list[dict[str, Any]]:
        (seen,) = await self.client.call(ROOT_PATH, MANAGER_INTERFACE, "ListSeenInitiators", "a{sv}", [{}])
        targets = {p["Iqn"]: p["Name"] for _, p in await self.of(TARGET_INTERFACE)}
        return [
            {
                "last_seen": _local_time(s["LastSeen"]),
                "initiator": s["Initiator"] or "(unnamed)",
                "address": s["Address"] or "-",
                "target": targets.get(s["Target"], s["Target"]),
                "outcome": OUTCOMES.get((s["Outcome"], s["Reason"]), f"{s['Outcome']}: {s['Reason']}"),
                "count": s["Count"],
                "first_seen": _local_time(s["FirstSeen"]),
            }
            for s in unpack_variants(seen)
        ]


OUTCOMES = {
    ("logged-in", ""): "logged in",
    ("refused", "not-in-acl"): "refused: not in ACL",
    ("refused", "chap"): "refused: CHAP authentication failed",
    ("refused", "negotiation"): "refused: negotiation failed",
    ("refused", "other"): "refused: other",
}


def _pair_text(status: dict[str, Any]) -> str:
    """``pair status`` for people: one line per item, times local, durations in ms."""

    def when(seconds: float | None) -> str:
        return _local_time(int(seconds)) if seconds else "never"

    paths = [
        f"{path['role']} {path['address']}: {'up' if path['up'] else 'down'}"
        + (f", rtt {path['rtt'] * 1000:.2f} ms" if path["rtt"] is not None and path["up"] else "")
        for path in status["paths"]
    ]
    offset = status["clock_offset"]
    lines = [
        ("peer", f"{status['peer_address']} port {status['port']} (node {status['peer_node_id'] or 'not yet seen'})"),
        ("connected", "yes" if status["connected"] else "no"),
        ("session since", when(status["session_started"])),
        ("paths", "; ".join(paths)),
        ("last message", f"{when(status['last_message'])} ({status['last_message_kind'] or '-'})"),
        ("clock offset", "unknown" if offset is None else f"{offset * 1000:+.1f} ms"),
        ("dropped", ", ".join(f"{reason} {count}" for reason, count in sorted(status["drops"].items()))),
    ]
    return "\n".join(f"{label + ':':<15}{value}" for label, value in lines)


def _local_time(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat(sep=" ", timespec="seconds")


def _read_document(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"invalid argument: cannot read {path}: {exc.strerror}", EXIT_INVALID) from None


def _seconds(text: str) -> float:
    """A time in seconds, for argparse: a number, not negative."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not seconds >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 or more seconds") from None
    return seconds


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise UsageError(f"invalid argument: {exc}", EXIT_INVALID) from None


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """Columns aligned on the widest cell, headers in upper case, sizes for people."""
    if not rows:
        return "(none)"
    cells = [[_cell(key, value) for key, value in row.items()] for row in rows]
    headers = [key.upper() for key in rows[0]]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if key == "size" and isinstance(value, int):
        return format_size(value)
    if key == "sources":
        return ",".join(value) or "any"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


async def dispatch(client: Client, args: argparse.Namespace) -> None:
    """Run one parsed command and print what it returns."""
    command = f"{args.group}_{args.action}" if hasattr(args, "action") else args.group
    # A fresh Commands per command: its cached object tree must show what the previous
    # command of a batch created.
    rows = await getattr(Commands(client), command.replace("-", "_"))(args)
    if rows is not None:
        print(json.dumps(rows, indent=2) if args.json else render_table(rows), flush=True)


async def run(commands: Sequence[tuple[str, argparse.Namespace]], call_timeout: float) -> None:
    """Run commands in order over one bus connection; the first error stops them."""
    client = await Client.connect(call_timeout or None)
    try:
        for where, args in commands:
            try:
                await dispatch(client, args)
            except (DBusError, UsageError, CallTimeout) as error:
                if where:
                    error.add_note(where)
                raise
    finally:
        client.close()


def parse_batch(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Namespace]]:
    """Every command of a batch, all parsed before the first one runs: a typo in line 9
    changes nothing."""
    commands = []
    for number, line in enumerate(_read_document(path).splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"invalid argument: line {number}: {exc}", EXIT_INVALID) from None
        if not words:
            continue
        if words[0] == "batch":
            raise UsageError(f"invalid argument: line {number}: a batch cannot run a batch", EXIT_INVALID)
        try:
            commands.append((f"line {number}", parser.parse_args(words)))
        except SystemExit:
            # argparse printed what is wrong with the line.
            raise UsageError(f"invalid argument: line {number} is not a command", EXIT_INVALID) from None
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = parse_batch(parser, args.file) if args.group == "batch" else [("", args)]
        run_without_loop(run(commands, args.call_timeout))
    except DBusError as error:
        message, code = describe(error)
        print(f"appliancectl: {_located(error, message)}", file=sys.stderr)
        return code
    except UsageError as error:
        print(f"appliancectl: {_located(error, str(error))}", file=sys.stderr)
        return error.exit_code
    except CallTimeout as error:
        message, code = describe_timeout(error)
        print(f"appliancectl: {_located(error, message)}", file=sys.stderr)
        return code
    except (FileNotFoundError, ConnectionRefusedError):
        message, code = NO_BUS
        print(f"appliancectl: {message}", file=sys.stderr)
        return code
    return 0


def _located(error: Exception, message: str) -> str:
    """The message, prefixed with the batch line that failed."""
    notes = getattr(error, "__notes__", ())
    return f"{notes[0]}: {message}" if notes else message
