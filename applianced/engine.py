"""The appliance engine: validates requests, changes the kernel and the state file together.

Every change follows one path (``_commit``): build the new ``Config`` from the current one,
plan the LIO changes between the two renderings, apply them, then write the state file. If
the kernel refuses an action or the file cannot be written, the kernel is reconciled back to
the previous configuration, so a failed operation leaves neither half-changed. Operations
are serialised by one lock; blocking kernel and file work runs in a worker thread so that
the event loop (D-Bus, watchdog) stays responsive.

This module knows nothing about D-Bus: the bus layer calls it and listens for changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from applianced import decoding, names, validation
from applianced.constants import DISKS_DIR_NAME
from applianced.errors import AlreadyExists, Busy, InvalidArgument, KernelError, NotFound, NotSupported, StateError
from applianced.iscsi import bootprofile, devices, diskfile, firewall, presence, targetcli
from applianced.iscsi.initiators import FILE_NAME as SEEN_FILE_NAME
from applianced.iscsi.initiators import LoginSource, SeenInitiators
from applianced.iscsi.kernel.model import DiskDevice, KernelConfig, TargetSessions, holds_registrations, render
from applianced.iscsi.kernel.plan import Action, plan
from applianced.state import Acl, BootClient, Chap, Config, Disk, Lun, Portal, StateStore, Target

log = logging.getLogger(__name__)

# How often a missing disk's path is looked at again: a file copied back brings no event.
MISSING_RECHECK_SECONDS = 5.0
# Marks an export made by ExportConfiguration, so that other JSON is refused at once.
EXPORT_FORMAT = "applianced-configuration"


@dataclasses.dataclass(frozen=True)
class _ExportHeader:
    """Read before the rest of an import, so that any other JSON is refused by name."""

    format: object = None


class Kernel(LoginSource, Protocol):
    """What the engine needs from the kernel; ``LioKernel`` is the real one."""

    def open(self) -> None: ...

    def observe(
        self, storage_objects: Iterable[str], targets: Iterable[str], disk_devices: Mapping[str, DiskDevice]
    ) -> KernelConfig: ...

    def apply(self, actions: Sequence[Action]) -> None: ...

    def sessions(self, target_iqn: str) -> TargetSessions:
        """What is logged in to one target. Callers ask per target, so that reading every
        target's sessions stays linear in the number of targets."""
        ...

    def saved_reservations(self, serials: Iterable[str]) -> dict[str, str]:
        """The persistent reservations (APTPL) saved for the disks of unit serials ``serials``."""
        ...

    def keep_reservations(self, serial: str, saved: str) -> None:
        """Keep another node's ``saved_reservations`` as this disk's ("" removes them)."""
        ...


class ReplicaView(Protocol):
    """What replication (applianced/replication) tells the target service about disks."""

    def unserved(self) -> Mapping[str, str]:
        """Disks this node must not serve now, with the reason: the peer's locked mirror copies."""
        ...

    def lowers(self) -> Mapping[str, str]:
        """Disks served through a mirror: the device node their disk device maps."""
        ...

    def standby(self) -> Mapping[str, str]:
        """Copies a takeover would serve from a device that runs already (the copy's
        prepared array): its node, over which their LUNs are made in advance."""
        ...

    def mirrored(self) -> Collection[str]:
        """Disks that belong to a mirror, in either role."""
        ...

    def filters(self) -> Mapping[str, firewall.PortalFilter]:
        """Firewall rules of the NBD exports this node serves to its peer."""
        ...


class NoReplication:
    """The view of a node with no mirrors."""

    def unserved(self) -> Mapping[str, str]:
        return {}

    def lowers(self) -> Mapping[str, str]:
        return {}

    def standby(self) -> Mapping[str, str]:
        return {}

    def mirrored(self) -> Collection[str]:
        return ()

    def filters(self) -> Mapping[str, firewall.PortalFilter]:
        return {}


def audit(operation: str, obj: str, outcome: str, message: str, level: int = logging.INFO) -> None:
    """Log one operation with the structured fields that the journal indexes."""
    log.log(level, message, extra={"OPERATION": operation, "OBJECT": obj, "OUTCOME": outcome})


class Appliance:
    """The node's configuration, kept in the kernel and in the state file."""

    def __init__(
        self,
        kernel: Kernel,
        store: StateStore,
        local_addresses: Callable[[], set[str]],
        firewall: firewall.Firewall,
        resolver: Callable[[str], Iterable[str]] = firewall.resolve_name,
    ) -> None:
        self.kernel = kernel
        self.store = store
        self.local_addresses = local_addresses
        self.firewall = firewall
        # Turns the DNS names of allow-lists into addresses each time rules are applied.
        self.resolver = resolver
        self.config = Config.new()
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[Config], None]] = []
        self._guards: list[Callable[[Config, Config], None]] = []
        # Disks whose backing is absent now, with the reason: the kernel does not have them.
        self.missing: dict[str, str] = {}
        # Copies that hold persistent reservations the peer sent (``keep_reservations``):
        # LIO takes reservations only into a backstore it makes, so theirs are not made in
        # advance (replication's ``standby``) but at the takeover, with the reservations.
        self._reserved: set[str] = set()
        # Recently seen initiators, sampled by a task the daemon starts (``seen.run()``).
        self.seen = SeenInitiators(kernel, store.directory / SEEN_FILE_NAME, lambda: self.config)
        # Which disks are mirror copies or served through a mirror (set by the daemon).
        self.replication: ReplicaView = NoReplication()
        # The rendering the kernel was last brought in line with, whole; None while unknown
        # (before the first reconcile, after a failed change). A commit plans from it, so a
        # change of replication's view (a copy promoted at a takeover) reads nothing back.
        self._applied: KernelConfig | None = None
        # The filters the firewall's table was last brought to, whole; None while unknown.
        self._filtered: dict[str, firewall.PortalFilter] | None = None
        # The hold table of a failover's switchover (``hold_portals``), as last written.
        self._held: firewall.Ruleset = ()
        self._holding = asyncio.Lock()

    @property
    def disks_dir(self) -> Path:
        return self.store.directory / DISKS_DIR_NAME

    def add_listener(self, listener: Callable[[Config], None]) -> None:
        """Call ``listener`` with the new configuration after every change."""
        self._listeners.append(listener)

    def add_guard(self, guard: Callable[[Config, Config], None]) -> None:
        """Have ``guard(current, new)`` see every change asked of this node, before anything
        happens; it raises a named error to refuse the change (failover: the passive node's
        protected targets are the active node's)."""
        self._guards.append(guard)

    # -- start-up and reload ---------------------------------------------------------------

    async def start(self, prepare: Callable[[Config], Awaitable[None]] | None = None) -> int:
        """Load the state file and bring the kernel in line with it; return the change count.

        ``prepare`` runs between the two, with the stored configuration: replication
        assembles its mirrors there, so that no disk is served around its mirror.
        """
        async with self._lock:
            stored = await asyncio.to_thread(self.store.load)
            await asyncio.to_thread(self.kernel.open)
            try:
                # The kernel keeps what a daemon stopped in a switchover held; this one holds nothing.
                await asyncio.to_thread(self.firewall.hold, ())
            except KernelError as exc:
                log.warning("portals held before this start may stay held: %s", exc)
            if stored is None:
                stored = self.config
                await asyncio.to_thread(self.store.save, stored)
            serials = {disk.serial: disk.name for disk in stored.disks.values()}
            saved = await asyncio.to_thread(self.kernel.saved_reservations, list(serials))
            self._reserved = {serials[serial] for serial, text in saved.items() if holds_registrations(text)}
            if prepare is not None:
                await prepare(stored)
            return await self._reconcile_stored(stored)

    async def reload(self) -> int:
        """Re-read the state file (SIGHUP) and reconcile; a bad file changes nothing."""
        async with self._lock:
            stored = await asyncio.to_thread(self.store.load)
            if stored is None:
                raise StateError(f"{self.store.path} is missing; keeping the running configuration")
            return await self._reconcile_stored(stored)

    async def _reconcile_stored(self, stored: Config) -> int:
        """Serve ``stored``: every disk whose backing is there, and what does not need the others."""
        before = self.missing
        self.missing = await asyncio.to_thread(presence.absent, stored.disks.values(), True)
        try:
            count = await asyncio.to_thread(self._reconcile, stored, self.config)
        except BaseException:
            self.missing = before
            raise
        self._report_presence(before, self.missing)
        self._set_config(stored)
        return count

    def _reconcile(self, desired: Config, previous: Config, read_back: bool = True) -> int:
        """Make the kernel match ``desired``, also removing what only ``previous`` had.
        Without ``read_back`` it plans from the rendering last applied, as a commit does,
        and leaves the firewall's table alone when its rules stay (the kernel is read when
        nothing is known to be applied)."""
        wanted = self._render(desired)
        known = None if read_back else self._applied
        actions = plan(self._observe(wanted, desired, previous) if known is None else known, wanted)
        self._applied = None
        self.kernel.apply(actions)
        self._applied = wanted
        filters = self._filters(desired, self._resolve(desired))
        changes = len(actions) + (self._apply_firewall(filters) if read_back or filters != self._filtered else 0)
        audit("reconcile", "node", "ok", f"reconciled the kernel with {changes} change(s)")
        return changes

    def _observe(self, wanted: KernelConfig, *configs: Config) -> KernelConfig:
        """What the kernel holds of ``configs``' objects (``wanted``: the rendering aimed at)."""
        disks = {name for config in configs for name in config.disks}
        iqns = {target.iqn for config in configs for target in config.targets.values()}
        return self.kernel.observe(sorted(disks), sorted(iqns), wanted.disk_devices)

    def _render(self, config: Config) -> KernelConfig:
        unserved = self.missing.keys() | self.replication.unserved().keys()
        standby = {
            disk: node
            for disk, node in self.replication.standby().items()
            if disk not in self.missing and disk not in self._reserved
        }
        return render(config, unserved, self.replication.lowers(), standby)

    def _filters(self, config: Config, resolved: Mapping[str, frozenset[str]]) -> dict[str, firewall.PortalFilter]:
        """The allow-lists of ``config``'s portals and the rules of replication's exports."""
        return {**firewall.filters(config, resolved), **self.replication.filters()}

    def _set_config(self, config: Config) -> None:
        self.config = config
        self.missing = {name: reason for name, reason in self.missing.items() if name in config.disks}
        self._reserved &= config.disks.keys()
        for listener in self._listeners:
            listener(config)

    # -- the one path every change takes ---------------------------------------------------

    def _transition(self, new: Config, from_kernel: bool = False) -> None:
        old = self.config
        try:
            # A portal LIO is about to drop keeps its old filter until it is gone, and a new
            # portal is filtered before LIO listens on it: no moment leaves either open.
            resolved = self._resolve(old, new)
            wanted = self._filters(new, resolved)
            # A commit that keeps the rules last applied leaves the table alone (nft read it
            # back, twice: 1.5 s of a 64-LUN takeover's enable under emulation); reconciles
            # and whole-configuration changes still read it.
            rules_change = from_kernel or wanted != self._filtered
            if rules_change:
                self._apply_firewall({**self._filters(old, resolved), **wanted})
            # Whole-configuration changes plan from what the kernel really holds, so that
            # objects made by other tools are adopted or corrected, not assumed.
            rendered = self._render(new)
            current = self._observe(rendered, old, new) if from_kernel or self._applied is None else self._applied
            self._applied = None
            self.kernel.apply(plan(current, rendered))
            self._applied = rendered
            if rules_change:
                self._apply_firewall(wanted)
            self.store.save(new)
        except Exception:
            # An unforeseen error (a bug) must not leave the kernel half-changed either.
            self._roll_back(old, new)
            raise

    def _resolve(self, *configs: Config) -> dict[str, frozenset[str]]:
        """The addresses of the allow-lists' DNS names now; a name that fails admits no one."""
        names_in = set().union(*(firewall.names_of(config) for config in configs))
        return firewall.resolve(names_in, self.resolver, strict=False)

    def _apply_firewall(self, filters: Mapping[str, firewall.PortalFilter]) -> int:
        """Bring the firewall table in line; 1 if it had to be replaced, else 0."""
        self._filtered = None
        replaced = self.firewall.apply(firewall.ruleset(filters.values()))
        self._filtered = dict(filters)
        if not replaced:
            return 0
        audit("firewall", "node", "ok", f"firewall rules replaced: {len(filters)} portal(s) with an allow-list")
        return 1

    def _roll_back(self, old: Config, new: Config) -> None:
        try:
            wanted = self._render(old)
            self.kernel.apply(plan(self._observe(wanted, old, new), wanted))
            self._applied = wanted
            self._apply_firewall(self._filters(old, self._resolve(old)))
        except Exception:
            # Nothing more can be done safely here; the next start reconciles again.
            log.critical("could not restore the previous kernel configuration", exc_info=True)

    async def _commit(
        self, operation: str, obj: str, new: Config, from_kernel: bool = False, guarded: bool = True
    ) -> None:
        if guarded:
            for guard in self._guards:
                guard(self.config, new)
        # Any change (a new target, a portal) may put targets with different allow-lists
        # behind one portal, where no rule could tell them apart.
        firewall.check_portals(new)
        if not from_kernel:
            # A CHAP user or target IQN change may make a boot profile's options too long.
            # (Imports, the whole-configuration changes, are checked by validate_config.)
            bootprofile.check_all(new)
        try:
            await asyncio.to_thread(self._transition, new, from_kernel)
        except (KernelError, StateError) as exc:
            audit(operation, obj, "failed", f"{operation} {obj} failed: {exc}", logging.ERROR)
            raise
        self._set_config(new)
        audit(operation, obj, "ok", f"{operation} {obj}")

    # -- disks whose backing comes and goes -------------------------------------------------

    async def watch_disks(self, events: presence.BackingEvents) -> None:
        """Follow device and mount events; look again every few seconds while a disk is missing."""
        while True:
            await events.wait(MISSING_RECHECK_SECONDS if self.missing else None)
            await self.refresh_disks()

    async def refresh_replication(self, read_back: bool = True) -> int:
        """Bring the kernel in line after replication changed its view (a mirror came or went,
        a copy was locked or unlocked); returns the change count. A role change on the
        clients' stall passes ``read_back=False`` (see ``_reconcile``): reading configfs and
        the nft table back took 0.4-1.7 s of a switchover's stall under emulation."""
        async with self._lock:
            config = self.config
            changes = await asyncio.to_thread(self._reconcile, config, config, read_back)
            self._set_config(config)
            return changes

    async def refresh_disks(self) -> bool:
        """Take disks whose backing went away out of the kernel, and serve those that came back.

        Returns whether the kernel changed. A failure is logged and tried again at the next
        event or look.
        """
        async with self._lock:
            config, before = self.config, self.missing
            now = await asyncio.to_thread(presence.absent, config.disks.values(), before.keys())
            if now.keys() == before.keys():
                self.missing = now
                return False
            self.missing = now
            try:
                await asyncio.to_thread(self._reconcile, config, config)
            except KernelError as exc:
                self.missing = before
                audit("refresh-disks", "node", "failed", f"could not follow a disk's backing: {exc}", logging.ERROR)
                return False
            self._report_presence(before, now)
            self._set_config(config)
            return True

    def _report_presence(self, before: Mapping[str, str], now: Mapping[str, str]) -> None:
        for name in sorted(now.keys() - before.keys()):
            audit(
                "disk-missing",
                name,
                "missing",
                f"disk {name} is missing, its LUNs are not exported: {now[name]}",
                logging.WARNING,
            )
        for name in sorted(before.keys() - now.keys()):
            audit("disk-back", name, "ok", f"disk {name} is back: its LUNs are exported again")

    def _refuse_if_mirrored(self, name: str, change: str) -> None:
        if name in self.replication.mirrored():
            raise Busy(f"disk {name!r} is mirrored to the peer node; {change} would break the mirror: delete it first")

    def _refuse_if_missing(self, name: str, change: str) -> None:
        if name in self.missing:
            raise NotSupported(f"disk {name!r} is missing ({self.missing[name]}); {change} needs its backing")

    # -- disks -----------------------------------------------------------------------------

    async def create_disk(
        self,
        name: str,
        size: int,
        path: str = "",
        description: str = "",
        write_back: bool = False,
        serial: str = "",
    ) -> Disk:
        """A sparse file-backed disk; ``serial`` is given only to the peer's copy of a
        mirrored disk (replication locks it before it exists, so it is never served)."""
        async with self._lock:
            names.validate_object_name("disk", name)
            if name in self.config.disks:
                raise AlreadyExists(f"disk {name!r} exists already")
            validation.check_size(size)
            if serial:
                self._refuse_serial_in_use(validation.check_serial(serial))
            file_path = self._disk_path(name, path)
            disk = Disk(
                name=name,
                path=str(file_path),
                size=size,
                serial=serial or str(uuid.uuid4()),
                description=validation.check_description(description),
                write_back=write_back,
                backstore="dm",
            )
            if write_back:
                audit("create-disk", name, "warning", f"disk {name} uses write-back caching: a power cut loses writes")
            await asyncio.to_thread(diskfile.create, file_path, validation.marker_of(disk))
            try:
                await self._commit("create-disk", name, self.config.with_disk(disk))
            except BaseException:
                file_path.unlink(missing_ok=True)
                raise
            return disk

    async def create_block_disk(self, name: str, device: str, description: str = "") -> Disk:
        """A disk backed by a whole block device or partition (an LV, a RAID, a disk)."""
        async with self._lock:
            names.validate_object_name("disk", name)
            if name in self.config.disks:
                raise AlreadyExists(f"disk {name!r} exists already")
            block = await asyncio.to_thread(devices.resolve, device)
            for disk in self.config.disks.values():
                if disk.kind == "block" and os.path.realpath(disk.path) == block.node:
                    raise AlreadyExists(f"{block.node} is already the device of disk {disk.name!r}")
            await asyncio.to_thread(devices.refuse_if_in_use, block)
            disk = Disk(
                name,
                block.stable_path,
                block.size,
                str(uuid.uuid4()),
                validation.check_description(description),
                kind="block",
                backstore="dm",
            )
            await self._commit("create-disk", name, self.config.with_disk(disk))
            return disk

    async def modify_disk(
        self,
        name: str,
        description: str | None = None,
        shared: bool | None = None,
        backstore: str | None = None,
        force: bool = False,
    ) -> Disk:
        """Change a disk's description, whether several targets may export it, or how LIO
        reaches it (a "direct" disk moves onto a device of its own, which replication needs:
        its backstore is made again, so that is Busy while initiators use it, unless ``force``)."""
        async with self._lock:
            disk = self._disk(name)
            changes: dict[str, object] = {}
            if backstore is not None and backstore != disk.backstore:
                if backstore not in validation.BACKSTORES:
                    raise InvalidArgument(f"backstore {backstore!r} is not one of {', '.join(validation.BACKSTORES)}")
                self._refuse_if_mirrored(name, "changing its backstore")
                users = await self.sessions_on_disk(name)
                if users and not force:
                    raise Busy(f"disk {name!r} is in use by {', '.join(users)}; its LUNs are made again (use force)")
                changes["backstore"] = backstore
            if description is not None:
                changes["description"] = validation.check_description(description)
            if shared is not None:
                exporters = self._exporters(name)
                if not shared and len(exporters) > 1:
                    raise Busy(f"disk {name!r} is exported by targets {', '.join(exporters)}; keep one of them first")
                changes["shared"] = shared
            modified = dataclasses.replace(disk, **changes)
            if modified != disk:
                await self._commit("modify-disk", name, self.config.with_disk(modified))
            return modified

    async def sessions_on_disk(self, disk_name: str) -> list[str]:
        """The initiators logged in to targets that export ``disk_name``."""
        who: set[str] = set()
        for target in self.config.targets.values():
            if any(lun.disk == disk_name for lun in target.luns):
                who |= {s.initiator for s in (await self.sessions(target.iqn)).sessions}
        return sorted(who)

    def _exporters(self, disk_name: str) -> list[str]:
        return sorted(t.name for t in self.config.targets.values() if any(lun.disk == disk_name for lun in t.luns))

    def _refuse_if_used_locally(self, disk: Disk) -> None:
        """Busy if the node itself uses the disk: exporting it would corrupt the data."""
        if disk.kind == "block":
            devices.refuse_if_in_use(devices.resolve(disk.path))
        else:
            devices.refuse_file_if_in_use(disk.path)

    async def import_disk(self, path: str, name: str = "", description: str = "") -> Disk:
        """Take over a disk file made by applianced (here or on another node), keeping its serial."""
        async with self._lock:
            file_path = validation.check_path(path)
            marker = validation.check_marker(await asyncio.to_thread(diskfile.read_marker, file_path))
            await asyncio.to_thread(devices.refuse_file_if_in_use, str(file_path))
            name = names.validate_object_name("disk", name or marker.name)
            if name in self.config.disks:
                raise AlreadyExists(f"disk {name!r} exists already; import it under another name")
            for disk in self.config.disks.values():
                if disk.path == str(file_path):
                    raise AlreadyExists(f"{file_path} is already the backing file of disk {disk.name!r}")
                if disk.serial == marker.serial:
                    raise AlreadyExists(f"disk {disk.name!r} already has serial {marker.serial} (a copy of this file?)")
            disk = Disk(
                name,
                str(file_path),
                marker.size,
                marker.serial,
                validation.check_description(description),
                backstore="dm",
            )
            # The trailer carries the disk's name, so that the file imports again as the same disk.
            renamed = validation.marker_of(disk)
            if renamed != marker:
                await asyncio.to_thread(diskfile.rename, file_path, renamed)
            try:
                await self._commit("import-disk", name, self.config.with_disk(disk))
            except BaseException:
                if renamed != marker:
                    await asyncio.to_thread(diskfile.rename, file_path, marker)
                raise
            return disk

    def _refuse_serial_in_use(self, serial: str, but: str = "") -> None:
        holder = next((d.name for d in self.config.disks.values() if d.serial == serial and d.name != but), None)
        if holder is not None:
            raise AlreadyExists(f"disk {holder!r} already has serial {serial}")

    async def set_disk_serial(self, name: str, serial: str = "") -> Disk:
        """Give a disk another unit serial (a new one if ``serial`` is empty): a disk that
        becomes the copy of a mirrored disk takes its serial, and a former copy gets one of
        its own, so that it never passes for the other half at a multipath initiator."""
        async with self._lock:
            disk = self._disk(name)
            serial = validation.check_serial(serial) if serial else str(uuid.uuid4())
            self._refuse_serial_in_use(serial, but=name)
            changed = dataclasses.replace(disk, serial=serial)
            if changed == disk:
                return disk
            if disk.kind == "file":
                await asyncio.to_thread(diskfile.rename, Path(disk.path), validation.marker_of(changed))
            try:
                await self._commit("set-disk-serial", name, self.config.with_disk(changed))
            except BaseException:
                if disk.kind == "file":
                    await asyncio.to_thread(diskfile.rename, Path(disk.path), validation.marker_of(disk))
                raise
            return changed

    def _disk_path(self, name: str, path: str) -> Path:
        if not path:
            self.disks_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            file_path = self.disks_dir / f"{name}.img"
        else:
            file_path = validation.check_path(path)
            if not file_path.parent.is_dir():
                raise InvalidArgument(f"directory {str(file_path.parent)!r} does not exist")
        if any(disk.path == str(file_path) for disk in self.config.disks.values()):
            raise AlreadyExists(f"{file_path} is already the backing file of another disk")
        if file_path.exists():
            raise AlreadyExists(f"{file_path} exists already; applianced does not overwrite files")
        return file_path

    async def extend_disk(self, name: str, size: int, mirror: Callable[[Disk], Awaitable[None]] | None = None) -> Disk:
        """Grow a disk while it may be in use; initiators see the new capacity on rescan.

        A mirrored disk grows only through replication, which passes ``mirror``: it grows
        the layers between the file and the disk device (the loop device, the leg, the
        array) once the file has grown, before the disk device and the configuration do.
        """
        async with self._lock:
            disk = self._disk(name)
            if disk.kind == "block":
                raise NotSupported(f"disk {name!r} follows its device; grow the device and initiators see it on rescan")
            if size < disk.size:
                raise InvalidArgument(f"disk {name!r} is {disk.size} bytes; shrinking would destroy data")
            if size == disk.size:
                return disk
            validation.check_size(size)
            self._refuse_if_missing(name, "extending it")
            if mirror is None:
                self._refuse_if_mirrored(name, "extending it alone (grow the mirror, both halves at once)")
            grown = dataclasses.replace(disk, size=size)
            path = Path(disk.path)
            # The file grows first so that LIO never exports more than the file holds.
            try:
                await asyncio.to_thread(diskfile.grow, path, validation.marker_of(disk), validation.marker_of(grown))
            except OSError as exc:
                raise InvalidArgument(f"cannot grow {path}: {exc.strerror}") from None
            try:
                if mirror is not None:
                    await mirror(grown)
                await self._commit("extend-disk", name, self.config.with_disk(grown))
            except BaseException:
                await asyncio.to_thread(diskfile.shrink_back, path, validation.marker_of(disk))
                raise
            return grown

    async def delete_disk(self, name: str, remove_file: bool = False) -> None:
        async with self._lock:
            disk = self._disk(name)
            self._refuse_if_mirrored(name, "deleting it")
            if remove_file and disk.kind == "block":
                raise InvalidArgument(f"disk {name!r} is a block device; applianced never removes devices")
            users = [t.name for t in self.config.targets.values() if any(lun.disk == name for lun in t.luns)]
            if users:
                raise Busy(f"disk {name!r} is exported by target(s) {', '.join(sorted(users))}; remove the LUN first")
            await self._commit("delete-disk", name, self.config.without_disk(name))
            if remove_file:
                await asyncio.to_thread(Path(disk.path).unlink, missing_ok=True)
                audit("delete-disk", name, "ok", f"removed backing file {disk.path}")

    def _disk(self, name: str) -> Disk:
        try:
            return self.config.disks[name]
        except KeyError:
            raise NotFound(f"disk {name!r} does not exist") from None

    # -- targets ---------------------------------------------------------------------------

    async def create_target(self, name: str, iqn: str = "", description: str = "", alias: str = "") -> Target:
        async with self._lock:
            names.validate_object_name("target", name)
            if name in self.config.targets:
                raise AlreadyExists(f"target {name!r} exists already")
            if iqn:
                iqn = names.normalize_iscsi_name(iqn, "target IQN")
            else:
                iqn = names.generate_target_iqn(self.config.iqn_prefix, name)
            holder = next((t.name for t in self.config.targets.values() if t.iqn == iqn), None)
            if holder is not None:
                raise AlreadyExists(f"IQN {iqn} is already used by target {holder!r}")
            target = Target(
                name=name,
                iqn=iqn,
                description=validation.check_description(description),
                alias=validation.check_alias(alias),
            )
            await self._commit("create-target", name, self.config.with_target(target))
            return target

    async def delete_target(self, name: str, force: bool = False) -> None:
        async with self._lock:
            target = self._target(name)
            self._refuse_if_booting(name, f"target {name!r}")
            # A portal kept only for this target would otherwise start serving every target.
            own = [p.key for p in self.config.portals if p.targets == (name,)]
            if own:
                raise Busy(f"portal(s) {', '.join(own)} serve only target {name!r}; delete them first")
            portals = tuple(
                dataclasses.replace(p, targets=tuple(t for t in p.targets if t != name)) for p in self.config.portals
            )
            if not force:
                await self._refuse_if_sessions(target, "deleting it")
            new = dataclasses.replace(self.config.without_target(name), portals=portals)
            await self._commit("delete-target", name, new)

    async def modify_target(
        self,
        name: str,
        *,
        description: str | None = None,
        alias: str | None = None,
        enabled: bool | None = None,
        iqn: str | None = None,
        header_digest: str | None = None,
        data_digest: str | None = None,
        force: bool = False,
    ) -> Target:
        """Change a target's settings in one commit; disruptive changes need ``force``."""
        async with self._lock:
            target = self._target(name)
            changes: dict[str, object] = {}
            if description is not None:
                changes["description"] = validation.check_description(description)
            if alias is not None:
                changes["alias"] = validation.check_alias(alias)
            if enabled is not None:
                changes["enabled"] = enabled
            for key, digest in (("header_digest", header_digest), ("data_digest", data_digest)):
                if digest is not None:
                    changes[key] = validation.check_digest(digest)
            if iqn is not None:
                iqn = names.normalize_iscsi_name(iqn, "target IQN")
                holder = next((t.name for t in self.config.targets.values() if t.iqn == iqn and t.name != name), None)
                if holder is not None:
                    raise AlreadyExists(f"IQN {iqn} is already used by target {holder!r}")
                changes["iqn"] = iqn
            modified = dataclasses.replace(target, **changes)
            if modified == target:
                return target
            if not force and (modified.iqn != target.iqn or (target.enabled and not modified.enabled)):
                change = "changing its IQN" if modified.iqn != target.iqn else "disabling it"
                await self._refuse_if_sessions(target, change)
            await self._commit("modify-target", name, self.config.with_target(modified))
            return modified

    async def adopt_targets(self, targets: Sequence[Target]) -> None:
        """Take ``targets`` as the peer node defined them (failover keeps the passive node's
        copy of the active node's protected targets), in one commit, replacing targets of
        the same names; their LUNs name this node's disks. Nothing changes when one of them
        is invalid here."""
        async with self._lock:
            new = self.config
            for target in targets:
                new = new.with_target(target)
            if new == self.config:
                return
            validation.validate_config(new, await asyncio.to_thread(self.local_addresses), self.config.disks)
            await self._commit("adopt-targets", ",".join(t.name for t in targets), new, guarded=False)

    async def set_targets_enabled(self, target_names: Sequence[str], enabled: bool) -> None:
        """Enable or disable several targets in one commit (a failover's role change):
        disabling drops their sessions, without asking. The kernel is brought in line even
        when the targets were so already: the disks of copies that a takeover promoted are
        served by this reconcile."""
        async with self._lock:
            new = self.config
            for name in target_names:
                new = new.with_target(dataclasses.replace(self._target(name), enabled=enabled))
            if new != self.config:
                operation = "enable-targets" if enabled else "disable-targets"
                await self._commit(operation, ",".join(target_names), new, guarded=False)
                return
        await self.refresh_replication()

    async def hold_portals(self, portals: Collection[tuple[str, int]]) -> None:
        """Hold the portals at these (address, port) pairs and release any other held: a
        failover's switchover keeps the addresses it hands over until the peer can take
        them, with their sessions silenced and new connections refused (iscsi/firewall.py).
        Not under the engine's lock: the hold is on the clients' stall, and touches neither
        the configuration nor the kernel's targets. A daemon that starts holds nothing."""
        held = firewall.held_ruleset(portals)
        async with self._holding:
            if held != self._held:
                await asyncio.to_thread(self.firewall.hold, held)
                self._held = held

    def _target(self, name: str) -> Target:
        try:
            return self.config.targets[name]
        except KeyError:
            raise NotFound(f"target {name!r} does not exist") from None

    async def sessions(self, target_iqn: str) -> TargetSessions:
        """What is logged in to one target."""
        return await asyncio.to_thread(self.kernel.sessions, target_iqn)

    async def saved_reservations(self, disks: Sequence[str]) -> dict[str, str]:
        """The persistent reservations (APTPL) that LIO saved for each of ``disks``, as its file."""
        serials = {disk: self._disk(disk).serial for disk in disks}
        saved = await asyncio.to_thread(self.kernel.saved_reservations, serials.values())
        return {disk: saved[serial] for disk, serial in serials.items()}

    async def keep_reservations(self, disk: str, saved: str) -> None:
        """Keep ``saved`` (the peer's ``saved_reservations`` of the disk that ``disk`` is the
        copy of, same serial) for the backstore that a takeover makes of ``disk``: one made
        in advance, which LIO gave no reservations, goes (and comes back once they go)."""
        await asyncio.to_thread(self.kernel.keep_reservations, self._disk(disk).serial, saved)
        reserved = holds_registrations(saved)
        if (disk in self._reserved) != reserved:
            if reserved:
                self._reserved.add(disk)
            else:
                self._reserved.discard(disk)
            await self.refresh_replication()

    async def _refuse_if_sessions(self, target: Target, change: str, initiator: str | None = None) -> None:
        sessions = [s for s in (await self.sessions(target.iqn)).sessions if initiator in (None, s.initiator)]
        if sessions:
            who = ", ".join(sorted({s.initiator for s in sessions}))
            raise Busy(
                f"target {target.name!r} has logged-in session(s) from {who}; {change} would disrupt them (use force)"
            )

    # -- LUNs ------------------------------------------------------------------------------

    async def add_lun(
        self, target_name: str, disk_name: str, number: int | None = None, read_only: bool = False
    ) -> Lun:
        async with self._lock:
            target = self._target(target_name)
            disk = self._disk(disk_name)
            self._refuse_if_missing(disk_name, "exporting it")
            exporters = self._exporters(disk_name)
            if target_name in exporters:
                raise AlreadyExists(f"target {target_name!r} exports disk {disk_name!r} already")
            if exporters and not disk.shared:
                raise Busy(
                    f"disk {disk_name!r} is already exported by target {exporters[0]!r}"
                    " (a disk marked shared may be exported by several targets)"
                )
            await asyncio.to_thread(self._refuse_if_used_locally, disk)
            used = {lun.number for lun in target.luns}
            if number is None:
                number = next((n for n in range(validation.MAX_LUN + 1) if n not in used), None)
                if number is None:
                    raise Busy(f"target {target_name!r} has no free LUN number")
            elif not 0 <= number <= validation.MAX_LUN:
                raise InvalidArgument(f"LUN {number} is out of range 0-{validation.MAX_LUN}")
            elif number in used:
                raise AlreadyExists(f"target {target_name!r} has a LUN {number} already")
            lun = Lun(number=number, disk=disk_name, read_only=read_only)
            luns = tuple(sorted((*target.luns, lun), key=lambda item: item.number))
            new = self.config.with_target(dataclasses.replace(target, luns=luns))
            await self._commit("add-lun", f"{target_name}/lun{number}", new)
            return lun

    async def remove_lun(self, target_name: str, number: int, force: bool = False) -> None:
        async with self._lock:
            target = self._target(target_name)
            if target.lun(number) is None:
                raise NotFound(f"target {target_name!r} has no LUN {number}")
            self._refuse_if_booting(target_name, f"LUN {number} of target {target_name!r}", lun=number)
            if not force:
                await self._refuse_if_sessions(target, f"removing LUN {number}")
            luns = tuple(lun for lun in target.luns if lun.number != number)
            new = self.config.with_target(dataclasses.replace(target, luns=luns))
            await self._commit("remove-lun", f"{target_name}/lun{number}", new)

    # -- ACLs ------------------------------------------------------------------------------

    async def add_acl(self, target_name: str, initiator: str) -> Acl:
        async with self._lock:
            target = self._target(target_name)
            initiator = names.normalize_iscsi_name(initiator, "initiator name")
            if target.acl(initiator) is not None:
                raise AlreadyExists(f"initiator {initiator} is already allowed on target {target_name!r}")
            acl = Acl(initiator=initiator)
            new = self.config.with_target(dataclasses.replace(target, acls=(*target.acls, acl)))
            await self._commit("add-acl", f"{target_name}/{initiator}", new)
            return acl

    async def remove_acl(self, target_name: str, initiator: str, force: bool = False) -> None:
        async with self._lock:
            target = self._target(target_name)
            initiator = names.normalize_iscsi_name(initiator, "initiator name")
            if target.acl(initiator) is None:
                raise NotFound(f"initiator {initiator} is not allowed on target {target_name!r}")
            self._refuse_if_booting(target_name, f"the ACL of {initiator}", initiator=initiator)
            if not force:
                await self._refuse_if_sessions(target, f"removing the ACL of {initiator}", initiator)
            acls = tuple(acl for acl in target.acls if acl.initiator != initiator)
            new = self.config.with_target(dataclasses.replace(target, acls=acls))
            await self._commit("remove-acl", f"{target_name}/{initiator}", new)

    async def force_logout(self, target_name: str, initiator: str) -> None:
        """Drop an initiator's sessions by re-creating its ACL; the configuration is unchanged.

        LIO ends the sessions of an ACL that goes away. The initiator may log in again at
        once; to keep it out, remove its ACL instead.
        """
        async with self._lock:
            target = self._target(target_name)
            initiator = names.normalize_iscsi_name(initiator, "initiator name")
            if not any(s.initiator == initiator for s in (await self.sessions(target.iqn)).sessions):
                raise NotFound(f"initiator {initiator} has no session on target {target_name!r}")
            acls = tuple(acl for acl in target.acls if acl.initiator != initiator)
            without = self._render(self.config.with_target(dataclasses.replace(target, acls=acls)))
            desired = self._render(self.config)

            def bounce() -> None:
                try:
                    self.kernel.apply(plan(desired, without))
                    self.kernel.apply(plan(without, desired))
                except KernelError:
                    self._roll_back(self.config, self.config)
                    raise

            await asyncio.to_thread(bounce)
            audit("force-logout", f"{target_name}/{initiator}", "ok", f"logged {initiator} out of {target_name}")

    # -- CHAP ------------------------------------------------------------------------------

    async def set_target_chap(self, target_name: str, chap: Chap | None) -> None:
        """CHAP for every initiator of the target without credentials of its own."""
        async with self._lock:
            target = self._target(target_name)
            new = self.config.with_target(dataclasses.replace(target, chap=validation.check_chap(chap)))
            await self._commit("set-target-chap", target_name, new)

    async def set_acl_chap(self, target_name: str, initiator: str, chap: Chap | None) -> None:
        async with self._lock:
            target = self._target(target_name)
            initiator = names.normalize_iscsi_name(initiator, "initiator name")
            if target.acl(initiator) is None:
                raise NotFound(f"initiator {initiator} is not allowed on target {target_name!r}")
            acls = tuple(
                dataclasses.replace(acl, chap=validation.check_chap(chap)) if acl.initiator == initiator else acl
                for acl in target.acls
            )
            new = self.config.with_target(dataclasses.replace(target, acls=acls))
            await self._commit("set-acl-chap", f"{target_name}/{initiator}", new)

    async def set_discovery_chap(self, chap: Chap | None) -> None:
        async with self._lock:
            if chap is not None and not chap.user:
                raise InvalidArgument("discovery CHAP needs a user name")
            new = dataclasses.replace(self.config, discovery_chap=validation.check_chap(chap))
            await self._commit("set-discovery-chap", "node", new)

    # -- boot clients ----------------------------------------------------------------------

    async def create_boot_client(
        self,
        name: str,
        target_name: str,
        initiator: str,
        *,
        lun: int = 0,
        mac: str = "",
        portal: str = "",
        secondary_portal: str = "",
        firmware: str = bootprofile.FIRMWARE_ALL,
    ) -> BootClient:
        async with self._lock:
            if name in self.config.boot_clients:
                raise AlreadyExists(f"boot profile {name!r} exists already")
            target = self._target(target_name)
            initiator = names.normalize_iscsi_name(initiator, "initiator name")
            if target.acl(initiator) is None:
                raise NotFound(f"initiator {initiator} is not allowed on target {target_name!r}; add its ACL first")
            if not 0 <= lun <= bootprofile.MAX_BOOT_LUN:
                raise InvalidArgument(f"boot LUN {lun} is out of range 0-254 (LUN 255 crashes the Microsoft initiator)")
            if target.lun(lun) is None:
                raise NotFound(f"target {target_name!r} has no LUN {lun} to boot from")
            address, port = validation.parse_portal(portal) if portal else self._default_portal()
            secondary_address, secondary_port = (
                validation.parse_portal(secondary_portal) if secondary_portal else ("", 0)
            )
            client = BootClient(
                name, target_name, initiator, lun, address, port, mac, secondary_address, secondary_port, firmware
            )
            # The commit renders every profile, which validates this one (LUN 0-254, MAC,
            # addresses, firmware, option sizes) before anything changes.
            new = dataclasses.replace(self.config, boot_clients={**self.config.boot_clients, name: client})
            await self._commit("create-boot-profile", name, new)
            return client

    async def delete_boot_client(self, name: str) -> None:
        async with self._lock:
            if name not in self.config.boot_clients:
                raise NotFound(f"boot profile {name!r} does not exist")
            clients = {k: v for k, v in self.config.boot_clients.items() if k != name}
            await self._commit("delete-boot-profile", name, dataclasses.replace(self.config, boot_clients=clients))

    def _default_portal(self) -> tuple[str, int]:
        for portal in self.config.portals:
            if not ipaddress.ip_address(portal.address).is_unspecified:
                return portal.address, portal.port
        raise InvalidArgument("no portal with a specific address; give the address the client boots from")

    def _refuse_if_booting(self, target_name: str, what: str, lun: int | None = None, initiator: str = "") -> None:
        users = [
            c.name
            for c in self.config.boot_clients.values()
            if c.target == target_name and lun in (None, c.lun) and initiator in ("", c.initiator)
        ]
        if users:
            raise Busy(f"{what} is used by boot profile(s) {', '.join(sorted(users))}; delete them first")

    # -- the whole configuration -------------------------------------------------------------

    def export_configuration(self) -> dict[str, Any]:
        """The configuration as versioned JSON, secrets included (callers are root)."""
        return {"format": EXPORT_FORMAT, **self.config.to_json()}

    async def import_configuration(self, document: str | bytes, force: bool = False) -> None:
        """Replace the whole configuration with an export (this node keeps its own id)."""
        async with self._lock:
            header = decoding.decode(document, _ExportHeader, "configuration")
            if header.format != EXPORT_FORMAT:
                raise InvalidArgument("this is not an applianced configuration export")
            imported = Config.decode(document, "configuration")
            imported = dataclasses.replace(imported, node_id=self.config.node_id)
            # A missing disk that the import keeps as it is stays missing, as it would without the import.
            kept = {name for name in self.missing if imported.disks.get(name) == self.config.disks.get(name)}
            await self._check_replacement(imported, force, unchecked=kept)
            await self._commit("import-configuration", "node", imported, from_kernel=True)

    async def import_targetcli(self, document: str | bytes) -> Config:
        """Add what a targetcli saveconfig.json describes; returns the imported part."""
        async with self._lock:
            part = targetcli.convert(document, self.config.iqn_prefix)
            merged = validation.merge(self.config, part)
            adopted = [disk for disk in part.disks.values() if not diskfile.has_marker(Path(disk.path))]
            await self._check_replacement(merged, force=True, unchecked={d.name for d in adopted})
            # Every file is checked before the first one gets its trailer, and every trailer
            # added is taken off again if anything after it fails.
            for disk in adopted:
                await asyncio.to_thread(diskfile.check_adoptable, Path(disk.path), validation.marker_of(disk))
            done: list[Disk] = []
            try:
                for disk in adopted:
                    await asyncio.to_thread(diskfile.adopt, Path(disk.path), validation.marker_of(disk))
                    done.append(disk)
                await self._commit("import-targetcli", "node", merged, from_kernel=True)
            except BaseException:
                for disk in done:
                    await asyncio.to_thread(diskfile.unadopt, Path(disk.path), disk.size)
                raise
            return part

    async def _check_replacement(self, new: Config, force: bool, unchecked: Collection[str] = ()) -> None:
        local = await asyncio.to_thread(self.local_addresses)
        await asyncio.to_thread(validation.validate_config, new, local, unchecked)
        await asyncio.to_thread(firewall.resolve, firewall.names_of(new), self.resolver, True)
        for name in self.replication.mirrored():
            if new.disks.get(name) != self.config.disks.get(name):
                self._refuse_if_mirrored(name, "replacing or dropping it")
        if force:
            return
        kept = {target.iqn for target in new.targets.values()}
        for target in self.config.targets.values():
            if target.iqn not in kept:
                await self._refuse_if_sessions(target, "importing a configuration without it")

    # -- portals ---------------------------------------------------------------------------

    async def create_portal(self, address: str, port: int, targets: Sequence[str] = ()) -> Portal:
        """Listen on address:port for every target, or only for ``targets``."""
        async with self._lock:
            for name in targets:
                self._target(name)
            portal = Portal(
                address=validation.canonical_address(address),
                port=validation.check_port(port),
                targets=tuple(sorted(set(targets))),
            )
            if self.config.portal(portal.key) is not None:
                raise AlreadyExists(f"portal {portal.key} exists already")
            # pyroute2's synchronous socket runs an event loop of its own: keep it off ours.
            validation.check_portal(portal, self.config.portals, await asyncio.to_thread(self.local_addresses))
            new = dataclasses.replace(self.config, portals=(*self.config.portals, portal))
            await self._commit("create-portal", portal.key, new)
            return portal

    async def delete_portal(self, key: str) -> None:
        async with self._lock:
            if self.config.portal(key) is None:
                raise NotFound(f"portal {key} does not exist")
            new = dataclasses.replace(self.config, portals=tuple(p for p in self.config.portals if p.key != key))
            await self._commit("delete-portal", key, new)

    # -- source allow-lists ------------------------------------------------------------------

    async def set_allowed_sources(self, target_name: str, sources: Sequence[str], force: bool = False) -> Target:
        """Replace the sources that may reach a target's portals; empty: any source.

        Logged-in initiators whose address the new list does not admit would be cut off:
        Busy unless ``force``. MAC entries cannot be matched to a session's address, so
        they count as not admitting it.
        """
        async with self._lock:
            target = self._target(target_name)
            entries = firewall.normalize_sources(sources)
            names_in = {e for e in entries if firewall.kind(e) == "name"}
            resolved = await asyncio.to_thread(firewall.resolve, names_in, self.resolver, True)
            modified = dataclasses.replace(target, allowed_sources=entries)
            if modified == target:
                return target
            new = self.config.with_target(modified)
            firewall.check_portals(new)
            if not force:
                cut = sorted(
                    {
                        f"{s.initiator} ({address})"
                        for s in (await self.sessions(target.iqn)).sessions
                        for address in s.addresses
                        if address and not firewall.admits(entries, resolved, address)
                    }
                )
                if cut:
                    raise Busy(
                        f"target {target_name!r} has logged-in session(s) from {', '.join(cut)} that the new "
                        "allow-list would cut off (use force)"
                    )
            await self._commit("set-allowed-sources", target_name, new)
            return modified
