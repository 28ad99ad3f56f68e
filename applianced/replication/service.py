"""Replicated volumes on this node: the mirrors' records, their data path, the peer's half.

``Replication`` is what the daemon owns and the D-Bus layer calls. It keeps one record per
mirrored disk (``records``), drives the data path (``bridge``) off the event loop, and
talks to the peer node over the pair's authenticated link (``messages``): the source asks,
the target answers. It tells the target service which disks are locked copies and which
are served through their mirror (``ReplicaView``), and asks it to reconcile when that
changes: the disk device under a live LUN is reloaded, so initiators see a pause.

A monitor looks at every mirror each second. On the source it follows the array: a peer
leg that failed (the NBD timeout ran out, the cable is cut, the peer died) is taken out
and the mirror is paused, and so is a mirror whose peer link went silent or whose async
queue crossed its high-water mark; while paused for such a reason it tries to come back
every few seconds, once the peer's export answers and the generation identifiers allow
it, with a partial resync. When a resync completes, the copy is told which generation it
now holds. On the target it keeps the export served.

Every operation checks everything it can before it changes anything, on this node and,
where it needs it, on the peer; the records are written after each change, so a daemon
that crashed finds the data path running and adopts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from applianced.blockdev.md import MAX_WRITE_BEHIND, ArrayStatus, Leg
from applianced.engine import Appliance, audit
from applianced.errors import (
    AlreadyExists,
    ApplianceError,
    Busy,
    InvalidArgument,
    KernelError,
    NotFound,
    NotSupported,
    Unreachable,
)
from applianced.iscsi.firewall import PortalFilter
from applianced.peer.service import Peer
from applianced.replication import messages, throttle
from applianced.replication.bitmap import Bitmap
from applianced.replication.bridge import (
    DEFAULT_PORT,
    DEFAULT_REGION,
    DataPath,
    Export,
    Mirror,
    PeerEndpoint,
    Volume,
    export_filter,
    region_size,
)
from applianced.replication.generations import Generation, Verdict, compare
from applianced.replication.records import (
    ASYNC,
    MODES,
    SOURCE,
    SYNC,
    TARGET,
    MirrorRecord,
    RecordStore,
    Tunables,
)
from applianced.replication.states import Intent, MirrorState, mirror_state
from applianced.state import Config, Disk
from applianced.steps import Steps, describe, log_failure
from applianced.validation import canonical_address

log = logging.getLogger(__name__)

MONITOR_SECONDS = 1.0
# How often a paused mirror tries to come back while its peer does not answer.
RESUME_SECONDS = 3.0
# How long a copy whose prepared array could not be made waits before it tries again.
PREPARE_RETRY_SECONDS = 60.0
# The peer link silent this long (its paths are down after 3.5 s): the source pauses the
# mirror before a write has to wait for the NBD timeout.
LINK_DOWN_GRACE = 1.0
# A daemon that starts gives its peer link this long to connect before it counts as down.
START_GRACE = 15.0
# How often a source asks its copy, while mirroring, whether it still is one.
PEER_CHECK_SECONDS = 10.0
# nbd-client's I/O timeout on the peer's leg: a dead peer fails the leg after this.
NBD_TIMEOUT = 5
# The peer answers a request under its replication lock, so after whatever change holds
# it: a reconcile of 64 LUNs took 5-15 s on an emulated node, and a resync's start timed
# out behind one at 2 s. Requests that make or change the peer's half also wait for its
# disk and data path.
SLOW_REQUEST = 30.0
# The status of the peer's half is answered without the lock (a read of its record).
QUICK_REQUEST = 2.0
# And a takeover this much longer for each of its disks: an emulated node promoted a copy
# in 1.2 s. An answer that never came would leave both nodes with the sources.
TAKE_OVER_PER_DISK = 2.0
# After taking copies over at the peer's request, the fenced exports' servers stop this
# much later: a failover's switchover enables the targets seconds after the answer, and
# 64 servers stopping (5.9 s of an emulated vCPU) and the reconcile after them (under the
# engine's lock) fell on that enable. Fenced, a server serves nothing meanwhile.
FENCED_SERVERS_LINGER = 10.0

T = TypeVar("T")
W = TypeVar("W")


@dataclass
class ResyncProgress:
    """A resync while it runs: what the reference's GETRESYNCSTATUS shows."""

    started: float
    total_regions: int
    dirty_regions: int
    start_writes: int  # sectors written to the array when it started (new writes since)
    synced_sectors: int = 0
    sync_sectors: int = 0
    rate: int = 0  # bytes per second


@dataclass
class Runtime:
    """What the daemon knows of one mirror besides its record."""

    record: MirrorRecord
    volume: Volume
    # A resync was asked for (create, continue, resync) and the peer's leg is not back.
    pending: bool = False
    # Why the mirror is paused or pending, for people ("" when nothing is wrong).
    reason: str = ""
    state: MirrorState = MirrorState.RESYNC_PENDING
    status: ArrayStatus | None = None
    resync: ResyncProgress | None = None
    passes: int = 0
    reconnects: int = 0
    last_attempt: float = 0.0
    last_check: float = 0.0
    bytes_replicated: int = 0
    throughput: int = 0
    _last_written: tuple[float, int] | None = None
    queue_length: int = 0
    since: float = field(default_factory=time.time)
    split_brain: bool = False
    # The copy's prepared array runs (as far as this daemon knows); it was reported in
    # sync, so the array is to be forked anew; when preparing may be tried again.
    array_prepared: bool = False
    fork_due: bool = False
    prepare_after: float = 0.0


@dataclass(frozen=True)
class Half:
    """This node's half of one mirror, as the failover sees it."""

    disk: str
    role: str  # SOURCE or TARGET
    mode: str
    state: MirrorState
    # The disk's name on the peer node.
    peer_disk: str


class Replication:
    """The mirrors of this node (no D-Bus here: the bus layer calls these methods)."""

    def __init__(self, directory: Path, engine: Appliance, peer: Peer, data: DataPath | None = None) -> None:
        self.store = RecordStore(directory)
        self.engine = engine
        self.peer = peer
        self.data = data or DataPath(directory)
        self.mirrors: dict[str, Runtime] = {}
        self._lock = asyncio.Lock()
        self._lowers: dict[str, str] = {}
        # Disks taken out of service for a moment (a switchover hands them to the peer).
        self._handing_over: set[str] = set()
        # Of those, sync mirrors switched over: their arrays stay (the peer's leg taken out)
        # as the copies' prepared arrays, and the LUNs that disabled targets hold stay on them.
        self._keeping_arrays: set[str] = set()
        self._listeners: list[Callable[[str, str], None]] = []
        # Stopping the servers of exports that a takeover fenced, after its answer.
        self._stopping: set[asyncio.Future[None]] = set()
        # Sources whose export a takeover fenced, its server not stopped yet, with the
        # export's firewall rule: it stays until then, so that the takeover's commit (whose
        # records swapped the addresses) changes no rule.
        self._fenced: dict[str, PortalFilter] = {}
        # A copy's prepared array came up in this monitor pass: the target service makes
        # its LUNs in advance at the pass's end (one reconcile for all of them).
        self._standby_grew = False
        # The throttles last applied (None: not yet since the start).
        self._throttled: list[throttle.Limit] | None = None
        # When the peer link was last seen connected; a daemon that just started counts
        # as connected for a while, until its first handshake.
        self._link_seen = time.monotonic() + START_GRACE
        for kind, handler in self._handlers().items():
            peer.handle(kind, handler)

    def add_listener(self, listener: Callable[[str, str], None]) -> None:
        """``listener(disk, event)`` after a change: "changed", "created", "deleted",
        "resync-started", "resync-completed", "resync-failed"."""
        self._listeners.append(listener)

    def _notify(self, disk: str, event: str = "changed") -> None:
        for listener in self._listeners:
            listener(disk, event)

    # -- what the target service is told (engine.ReplicaView) --------------------------
    # Asked from the reconcile's thread while the loop may add or remove mirrors: each
    # reads a copy of what it iterates (one step under the GIL), never the live dict, which
    # raised "dictionary changed size during iteration" while a peer made 64 mirrors.

    def unserved(self) -> Mapping[str, str]:
        out = {}
        for name, rt in list(self.mirrors.items()):
            if rt.record.role == TARGET:
                out[name] = f"the mirror copy of {rt.record.peer_address}'s disk, locked while it is a mirror target"
            elif name in self._handing_over:
                out[name] = "being handed over to the peer node"
            elif name not in self._lowers:
                out[name] = "its mirror is not assembled on this node"
        return out

    def lowers(self) -> Mapping[str, str]:
        return dict(self._lowers)

    def standby(self) -> Mapping[str, str]:
        return {
            name: self._mirror(rt).node
            for name, rt in list(self.mirrors.items())
            if (rt.record.role == TARGET and rt.array_prepared) or name in self._keeping_arrays
        }

    def mirrored(self) -> Collection[str]:
        return tuple(self.mirrors)

    def filters(self) -> Mapping[str, PortalFilter]:
        rules = [_export_rule(rt.record) for rt in list(self.mirrors.values()) if rt.record.role == TARGET]
        return {rule.key: rule for rule in [*rules, *self._fenced.values()]}

    # -- start-up ---------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        """Load the records and adopt or assemble every mirror's data path; called by the
        engine with its stored configuration before its first reconcile, so that a source
        disk is never served around its mirror."""
        records = await asyncio.to_thread(self.store.load)
        if records:
            await asyncio.to_thread(self.data.prepare)
        sources, copies = [], []
        for name, record in records.items():
            disk = config.disks.get(name)
            if disk is None:
                log.error("mirror %s names a disk this node does not have; its record is kept", name)
                continue
            rt = Runtime(record, self._volume(disk, record.size, record.region))
            self.mirrors[name] = rt
            if record.role == SOURCE:
                sources.append(rt)
            elif not record.unlocked:
                copies.append(rt)
        # All at once, as a takeover does: one after the other, 64 mirrors took longer
        # under emulation than a service may take to start.
        failed = await self._start_sources(sources)
        # A daemon that stopped in a takeover's last step left the fenced exports' servers.
        await self._stop_fenced(sources)
        _, unserved = await _on_threads(self._start_copy, copies)
        for rt, exc in [*failed, *unserved]:
            if not isinstance(exc, KernelError):
                raise exc
            rt.reason = f"the data path could not be assembled: {exc}"
            log.error("mirror %s: %s", rt.record.disk, rt.reason)
        for name in self.mirrors:
            self._notify(name, "created")
        if self.mirrors:
            await self._throttle()

    async def _assemble_sources(self, rts: Sequence[Runtime], taking_over: bool = False) -> None:
        """``_start_sources``; the error of the first that failed, raised after the others
        are served."""
        failed = await self._start_sources(rts, taking_over)
        if failed:
            raise failed[0][1]

    async def _start_sources(
        self, rts: Sequence[Runtime], taking_over: bool = False
    ) -> list[tuple[Runtime, BaseException]]:
        """Start each source's array from its local leg, all at once, and serve it; those
        that failed, each with its error. ``taking_over``: the copies' prepared arrays."""
        started, failed = await _on_threads(self._take_over_array if taking_over else self._start_array, rts)
        for rt, status in started:
            rt.status = status
        # From now on this node writes alone, before the disks are served again.
        alone = [rt for rt, status in started if not any(_connected(leg) for leg in status.legs)]
        await self._diverge(alone, "the peer's leg is not connected")
        for rt, _ in started:
            self._lowers[rt.record.disk] = self._mirror(rt).node
        return failed

    def _start_array(self, rt: Runtime) -> ArrayStatus:
        """(On a thread.) The source's array running, in the record's mode; its status."""
        return self._mirror(rt).start(self._write_behind(rt.record))

    def _take_over_array(self, rt: Runtime) -> ArrayStatus:
        """(On a thread.) ``_start_array`` for a copy that becomes the source alone."""
        rt.array_prepared = rt.fork_due = False
        return self._mirror(rt).take_over(self._write_behind(rt.record))

    async def run(self) -> None:
        """The monitor: every mirror looked at each second, until cancelled."""
        while True:
            await asyncio.sleep(MONITOR_SECONDS)
            await self._monitor_pass()

    async def _monitor_pass(self) -> None:
        """One look at every mirror; the copies' LUNs withdrawn before and made after, each
        in one reconcile."""
        try:
            await self._withdraw_due_standbys()
        except Exception:
            log.exception("replication monitor: the LUNs over the copies to fork anew were not withdrawn")
        for name in list(self.mirrors):
            # A copy's look awaits nothing that yields: with 64 copies, every failover look
            # of the passive node came over 0.5 s late under emulation (none on the source
            # node, whose looks wait for md on threads).
            await asyncio.sleep(0)
            try:
                async with self._lock:
                    if name in self.mirrors:
                        await self._watch(self.mirrors[name])
            except Exception:
                # One mirror's failure must not stop the others from being watched.
                log.exception("replication monitor: mirror %s", name)
        if self._standby_grew:
            self._standby_grew = False
            try:
                await self.engine.refresh_replication()
            except Exception:
                log.exception("replication monitor: the copies' LUNs were not made in advance")

    async def _withdraw_due_standbys(self) -> None:
        """The LUNs over every prepared array that this pass forks anew go in one reconcile,
        before the looks fork them: a reconcile per copy held this node's lock 5-15 s each
        with 64 LUNs under emulation, and resyncs that end together fork together."""
        async with self._lock:
            # If it fails, each look withdraws its own.
            await self._withdraw_standby(
                *(rt for rt in self.mirrors.values() if rt.record.role == TARGET and rt.fork_due)
            )

    # -- reading ----------------------------------------------------------------------

    def runtime(self, disk: str) -> Runtime:
        try:
            return self.mirrors[disk]
        except KeyError:
            raise NotFound(f"disk {disk!r} is not mirrored") from None

    def counters(self, disk: str) -> dict[str, int | float | str]:
        """The reference's counters of one mirror (GETMIRRORVOLINFO, GETRESYNCSTATUS), and
        bytes replicated and throughput."""
        rt = self.runtime(disk)
        now = time.time()
        resync = rt.resync
        region = rt.record.region
        status = rt.status
        done = resync.synced_sectors * 512 // region if resync else 0
        if resync is not None:
            phase = "copying"
        elif rt.state in (MirrorState.PAUSED, MirrorState.BROKEN, MirrorState.RESYNC_PENDING):
            phase = "waiting"
        else:
            phase = "idle"
        return {
            "MirrorElapsed": now - rt.record.created if rt.record.created else 0.0,
            "State": int(rt.state),
            "Type": rt.record.mode,
            "Reconnects": rt.reconnects,
            "QueueLength": rt.queue_length,
            "QueueHighWater": min(rt.record.tunables.high_water, MAX_WRITE_BEHIND),
            "QueueLowWater": rt.record.tunables.low_water,
            "ResyncBlock": done,
            "ResyncDirty": resync.dirty_regions if resync else 0,
            "ResyncTotal": rt.volume.regions,
            "ResyncNewWrites": max(0, _writes(status) - resync.start_writes) if resync and status else 0,
            "ResyncPasses": rt.passes,
            "ResyncPhase": phase,
            "ResyncElapsed": now - resync.started if resync else 0.0,
            "BytesReplicated": rt.bytes_replicated,
            "Throughput": rt.throughput,
        }

    def volume_state(self, disk: str) -> int:
        """The reference's number of the mirror's state (GETVOLUMEDRVSTATE), 0 without one."""
        rt = self.mirrors.get(disk)
        return int(rt.state) if rt else int(MirrorState.NONE)

    def halves(self) -> list[Half]:
        return [
            Half(name, rt.record.role, rt.record.mode, rt.state, self._peer_disk(rt))
            for name, rt in self.mirrors.items()
        ]

    # -- creating and deleting --------------------------------------------------------

    async def create(
        self,
        disk_name: str,
        mode: str,
        *,
        peer_disk: str = "",
        skip_initial_sync: bool = False,
        region: int = DEFAULT_REGION,
    ) -> Runtime:
        """Mirror a disk of this node to the peer node, which makes (or takes) the copy."""
        async with self._lock:
            disk = self._checked_source_disk(disk_name)
            if mode not in MODES:
                raise InvalidArgument(f"mode {mode!r} is not one of {', '.join(MODES)}")
            if disk.size % 4096:
                raise InvalidArgument(f"disk {disk_name!r} is not a multiple of 4 KiB; it cannot be mirrored")
            if skip_initial_sync and await self.engine.sessions_on_disk(disk_name):
                raise Busy(
                    f"disk {disk_name!r} is in use by initiators: it is not blank, so its sync cannot be skipped"
                )
            record_peer = self._pair_record()
            # The region as the bitmap will have it (doubled for a large disk), checked first.
            volume = self._volume(disk, disk.size, region_size(disk.size, region))
            generation = Generation.new()
            now = time.time()
            prepare = messages.Prepare(
                disk=disk_name,
                size=disk.size,
                serial=disk.serial,
                region=volume.region,
                mode=mode,
                source_address="",
                target_address=record_peer,
                tunables=Tunables(),
                generation=generation,
                existing=peer_disk,
                created=now,
            )
            answer = await self._ask(messages.PREPARE, prepare, messages.Prepared)
            record = MirrorRecord(
                disk=disk_name,
                role=SOURCE,
                mode=mode,
                source_address=answer.source_address,
                target_address=record_peer,
                port=answer.port,
                size=disk.size,
                region=volume.region,
                generation=generation,
                created=now,
                peer_disk=peer_disk or disk_name,
            )
            rt = Runtime(record, volume, pending=not skip_initial_sync)
            self.mirrors[disk_name] = rt
            try:
                await self._build_source(rt, disk, copy=not skip_initial_sync)
            except BaseException:
                await self._undo_create(rt)
                raise
            audit("mirror-create", disk_name, "ok", f"mirror of {disk_name} to {record_peer} created ({mode})")
            self._notify(disk_name, "created")
            return rt

    def _checked_source_disk(self, name: str) -> Disk:
        disk = self.engine.config.disks.get(name)
        if disk is None:
            raise NotFound(f"disk {name!r} does not exist")
        if name in self.mirrors:
            raise AlreadyExists(f"disk {name!r} is mirrored already")
        if name in self.engine.missing:
            raise NotSupported(f"disk {name!r} is missing ({self.engine.missing[name]})")
        if disk.backstore != "dm":
            raise NotSupported(
                f"disk {name!r} has a direct backstore (made by an older applianced or targetcli); "
                "convert it first: appliancectl disk modify --backstore dm"
            )
        return disk

    async def _build_source(self, rt: Runtime, disk: Disk, copy: bool) -> None:
        mirror = self._mirror(rt)
        endpoint = self._endpoint(rt.record)
        await asyncio.to_thread(mirror.create, endpoint)
        if copy:
            # The peer's leg is out before the disk device maps the array: every write
            # through it from then on is marked in the bitmap.
            await asyncio.to_thread(mirror.detach)
        await asyncio.to_thread(mirror.set_write_behind, self._write_behind(rt.record))
        self._lowers[disk.name] = mirror.node
        await self._save()
        await self.engine.refresh_replication()
        if copy:
            ranges = await asyncio.to_thread(self.data.allocated, rt.volume)
            await asyncio.to_thread(mirror.mark_dirty, ranges)
            await self._connect(rt, endpoint)

    async def _undo_create(self, rt: Runtime) -> None:
        name = rt.record.disk
        self._lowers.pop(name, None)
        self.mirrors.pop(name, None)
        try:
            await self._save()
            await self.engine.refresh_replication()  # the disk device maps the disk again
            await asyncio.to_thread(self._mirror(rt).disassemble)
            await asyncio.to_thread(self.data.release, rt.volume)
        except ApplianceError as exc:
            log.error("mirror %s: undoing a failed create left something behind: %s", name, exc)
        try:
            release = messages.Release(self._peer_disk(rt), discard=True)
            await self._ask(messages.RELEASE, release, messages.Done)
        except ApplianceError as exc:
            log.error("mirror %s: the peer's copy could not be released: %s", name, exc)

    async def delete(self, disk: str, local_only: bool = False) -> None:
        """Take the mirror apart: both halves become plain disks, both copies kept (the
        copy with a serial of its own). ``local_only`` releases this node's half alone
        (the reference's DELETELOCALMIRRORONLY), for a half whose peer is gone."""
        async with self._lock:
            rt = self.runtime(disk)
            if rt.record.role == TARGET and not local_only:
                raise NotSupported(
                    f"this node holds the copy of {disk!r}; delete the mirror on the source node "
                    f"({rt.record.source_address}), or release this half alone (local only)"
                )
            if not local_only:
                await self._peer_status(rt)  # the peer must be there
            if rt.record.role == SOURCE:
                self._lowers.pop(disk, None)
                await self.engine.refresh_replication()  # the disk device maps the disk again
                await asyncio.to_thread(self._mirror(rt).disassemble)
            else:
                await self._withdraw_standby(rt)
                await asyncio.to_thread(self._drop_copy, rt)
            await asyncio.to_thread(self.data.release, rt.volume)
            del self.mirrors[disk]
            await self._save()
            await self.engine.refresh_replication()
            if rt.record.role == TARGET:
                await self.engine.set_disk_serial(disk)  # unlocked: served again, as a disk of its own
            if not local_only:
                await self._ask(messages.RELEASE, messages.Release(self._peer_disk(rt)), messages.Done)
            audit("mirror-delete", disk, "ok", f"mirror of {disk} deleted{' on this node only' if local_only else ''}")
            self._notify(disk, "deleted")

    # -- pause, continue, break, resync -----------------------------------------------

    async def pause(self, disk: str, unlock: bool = False) -> str:
        """Stop replicating; every write is tracked, so the resync after continue is
        partial. ``unlock`` shows the copy read-only on the peer (for a backup): the node
        of that device there is returned."""
        async with self._lock:
            rt = self._source(disk, "pause")
            if unlock:
                await self._peer_status(rt)
            await self._set_intent(rt, Intent.PAUSE)
            await asyncio.to_thread(self._mirror(rt).detach)
            await self._diverge([rt], "paused by the administrator")
            node = ""
            if unlock:
                node = (await self._ask(messages.UNLOCK, messages.Disk(self._peer_disk(rt)), messages.Unlocked)).node
            await self._update_peer(rt)
            await self._refresh_state(rt)
            audit("mirror-pause", disk, "ok", f"mirror of {disk} paused{' and its copy unlocked' if unlock else ''}")
            return node

    async def resume(self, disk: str) -> None:
        """Continue a paused or broken mirror: a partial resync (full after a break)."""
        async with self._lock:
            rt = self._source(disk, "continue")
            peer_status = await self._peer_status(rt)
            if peer_status.unlocked:
                await self._ask(messages.LOCK, messages.Disk(self._peer_disk(rt)), messages.Done)
            if Intent(rt.record.intent) is Intent.BREAK:
                await self._save_record(rt, dataclasses.replace(rt.record, full_resync=True))
            await self._set_intent(rt, Intent.MIRROR)
            rt.pending, rt.passes, rt.split_brain = True, 0, False
            await self._update_peer(rt)
            await self._reconnect(rt, manual=True)
            audit("mirror-continue", disk, "ok", f"mirror of {disk} continued")

    async def break_mirror(self, disk: str) -> None:
        """Stop replicating and stop caring what differs: the next resync is full."""
        async with self._lock:
            rt = self._source(disk, "break")
            await self._set_intent(rt, Intent.BREAK)
            await asyncio.to_thread(self._mirror(rt).detach)
            await self._diverge([rt], "broken by the administrator")
            await self._save_record(rt, dataclasses.replace(rt.record, full_resync=True))
            await self._update_peer(rt)
            await self._refresh_state(rt)
            audit("mirror-break", disk, "ok", f"mirror of {disk} broken: the next resync is full")

    async def resync(self, disk: str) -> None:
        """Copy the whole disk to the peer again (also over a copy of unrelated data)."""
        async with self._lock:
            rt = self._source(disk, "resync")
            await self._peer_status(rt)
            await asyncio.to_thread(self._mirror(rt).detach)
            await self._diverge([rt], "a full resync was asked for")
            await self._save_record(rt, dataclasses.replace(rt.record, full_resync=True))
            await self._set_intent(rt, Intent.MIRROR)
            rt.pending, rt.passes, rt.split_brain = True, 0, False
            await self._update_peer(rt)
            await self._reconnect(rt, manual=True)
            audit("mirror-resync", disk, "ok", f"full resync of {disk} started")

    # -- settings ---------------------------------------------------------------------

    async def set_mode(self, disk: str, mode: str) -> None:
        """Switch between sync and async mode while the mirror runs."""
        async with self._lock:
            rt = self._source(disk, "change the mode of")
            if mode not in MODES:
                raise InvalidArgument(f"mode {mode!r} is not one of {', '.join(MODES)}")
            await self._save_record(rt, dataclasses.replace(rt.record, mode=mode))
            await asyncio.to_thread(self._mirror(rt).set_write_behind, self._write_behind(rt.record))
            await self._update_peer(rt, best_effort=True)
            audit("mirror-mode", disk, "ok", f"mirror of {disk} is {mode} now")
            self._notify(disk)

    async def tune(self, disk: str, **changes: int) -> Tunables:
        """Change the queue marks, the throttle or the resync pass limit, live."""
        async with self._lock:
            rt = self._source(disk, "tune")
            for key, value in changes.items():
                if key not in Tunables.__dataclass_fields__:
                    raise InvalidArgument(f"{key!r} is not a mirror setting")
                if value < 0 or (key in ("high_water", "max_resync_passes") and value == 0):
                    raise InvalidArgument(f"{key.replace('_', ' ')} {value} is out of range")
            tunables = dataclasses.replace(rt.record.tunables, **changes)
            if tunables.low_water >= tunables.high_water:
                raise InvalidArgument(
                    f"the low-water mark ({tunables.low_water}) must be below the high-water mark "
                    f"({tunables.high_water})"
                )
            await self._save_record(rt, dataclasses.replace(rt.record, tunables=tunables))
            mirror = self._mirror(rt)
            await asyncio.to_thread(mirror.set_write_behind, self._write_behind(rt.record))
            await asyncio.to_thread(mirror.set_resync_limit, tunables.throttle // 8)
            await self._update_peer(rt, best_effort=True)
            self._notify(disk)
            return tunables

    async def set_endpoints(self, disk: str, source_address: str, target_address: str) -> None:
        """Move the mirror's traffic to other addresses of the two nodes (the reference's
        CHANGEMIRRORENDPOINTS); the mirror pauses and comes back with a partial resync."""
        async with self._lock:
            rt = self._source(disk, "move")
            source_address = _unicast(source_address, "source address")
            target_address = _unicast(target_address, "target address")
            if source_address not in await asyncio.to_thread(self.engine.local_addresses):
                raise InvalidArgument(f"{source_address} is not an address of this node")
            await self._peer_status(rt)
            await asyncio.to_thread(self._mirror(rt).detach)
            await self._diverge([rt], "moving to new addresses")
            await self._save_record(
                rt, dataclasses.replace(rt.record, source_address=source_address, target_address=target_address)
            )
            await self._update_peer(rt)
            rt.pending = Intent(rt.record.intent) is Intent.MIRROR
            await self._reconnect(rt, manual=True)
            audit("mirror-endpoints", disk, "ok", f"mirror of {disk} runs from {source_address} to {target_address}")

    async def grow(self, disk: str, size: int) -> None:
        """Grow both halves of a mirrored disk file; the copy first, then this node's disk
        (its LUNs see the new capacity on rescan), then a partial resync."""
        async with self._lock:
            rt = self._source(disk, "grow")
            local = self.engine.config.disks[disk]
            if local.kind != "file":
                raise NotSupported(f"disk {disk!r} follows its device: grow the devices on both nodes, then resync")
            if size <= rt.record.size or size % 4096:
                raise InvalidArgument(f"a mirror grows by whole 4 KiB blocks, from {rt.record.size} bytes")
            region_size(size, rt.record.region)  # the bitmap's room
            await self._peer_status(rt)
            mirror = self._mirror(rt)
            await asyncio.to_thread(mirror.detach)
            await self._diverge([rt], "growing")
            await self._ask(messages.GROW, messages.Grow(self._peer_disk(rt), size), messages.Done)

            async def grow_layers(grown: Disk) -> None:
                await asyncio.to_thread(mirror.grow, size)

            await self.engine.extend_disk(disk, size, mirror=grow_layers)
            grown_record = dataclasses.replace(rt.record, size=size)
            rt.volume = self._volume(self.engine.config.disks[disk], size, rt.record.region)
            await self._save_record(rt, grown_record)
            rt.pending = True
            await self._reconnect(rt, manual=True)
            audit("mirror-grow", disk, "ok", f"mirror of {disk} grown to {size} bytes on both nodes")

    # -- roles ------------------------------------------------------------------------

    async def switchover(self, disk: str, force: bool = False) -> None:
        """Make the copy the source (the reference's SWITCHOVERVOLUME).

        On the source: only while mirroring, and not while initiators use the disk unless
        ``force`` (its LUNs go away here; the peer serves it from now on). On the target
        with ``force``: take over alone, when the source is gone ("fast and unsafe": if
        the old source still writes, this is split brain, detected when they meet again).
        """
        async with self._lock:
            rt = self.runtime(disk)
            if rt.record.role == TARGET:
                if not force:
                    raise NotSupported(
                        f"this node holds the copy of {disk!r}: switch over on the source "
                        f"({rt.record.source_address}), or take over alone with force"
                    )
                await self._take_over_alone([rt])
                return
            _refuse_unless_mirroring(rt)
            users = await self.engine.sessions_on_disk(disk)
            if users and not force:
                raise Busy(f"disk {disk!r} is in use by {', '.join(users)}; its LUNs would go away here (use force)")
            await self._peer_status(rt)
            await self._hand_over([rt])

    async def hand_over(self, disks: Sequence[str]) -> None:
        """Switch ``disks`` over to the peer together, whoever uses them (a failover's
        planned switchover): one reconcile here, one request to the peer, however many
        disks. All or nothing: if one copy cannot take over, every disk is served here
        again as before, and the error says why."""
        async with self._lock:
            rts = [self._source(disk, "switch over") for disk in disks]
            for rt in rts:
                _refuse_unless_mirroring(rt)
            await self._hand_over(rts)

    async def _hand_over(self, rts: list[Runtime]) -> None:
        names = [rt.record.disk for rt in rts]
        originals = [(rt, rt.record) for rt in rts]
        stopped: list[Runtime] = []  # whose array stopped: their leg is this node's export now
        steps = Steps()
        self._handing_over.update(names)
        self._keeping_arrays.update(rt.record.disk for rt in rts if rt.record.mode == SYNC)
        try:
            # No LUN in an enabled target: nothing writes here any more. (A failover disabled
            # its targets already: their LUNs stay, for the way back.)
            await steps.run("LUNs withdrawn", self.engine.refresh_replication(read_back=False))
            take_overs = await steps.run("arrays stopped", self._stop_arrays(rts, stopped))
            timeout = SLOW_REQUEST + TAKE_OVER_PER_DISK * len(rts)
            ask = self._ask(messages.TAKE_OVER, messages.TakeOvers(tuple(take_overs)), messages.Done, timeout)
            await steps.run("the peer took over", ask)
        except BaseException:
            # The copies did not take over: this node serves the disks again.
            try:
                for rt in stopped:
                    await asyncio.to_thread(self._export(rt).disassemble)
                await self._save_records(originals)
                await self._assemble_sources(stopped)
            finally:
                self._handing_over.difference_update(names)
                self._keeping_arrays.difference_update(names)
                await self.engine.refresh_replication()
                for rt in rts:
                    rt.pending = True
            raise
        self._handing_over.difference_update(names)
        self._keeping_arrays.difference_update(names)
        for rt in rts:
            rt.pending, rt.resync, rt.reason = False, None, ""
        await steps.run("reconciled", self.engine.refresh_replication(read_back=False))
        for rt in rts:
            await self._refresh_state(rt)
            disk = rt.record.disk
            audit("mirror-switchover", disk, "ok", f"{disk} switched over to {rt.record.source_address}")
        log.info("%d mirror(s) handed over to the peer: %s", len(rts), describe(steps.done))

    async def _stop_arrays(self, rts: list[Runtime], stopped: list[Runtime]) -> list[messages.TakeOver]:
        """Stop each array, roles swapped in the records; what the peer is to take over.
        ``stopped`` gets each runtime whose array stopped.

        The local legs are not exported here: the peer assembles each array from its own
        leg and adds this node's when it can reach it, and the monitor starts the exports
        of the records' new role. Starting a qemu-nbd per disk took seconds each under
        emulation, all of it in the clients' stall when it came before the peer's answer."""
        done, failed = await _on_threads(self._stop_array, rts)
        for rt, _ in done:
            stopped.append(rt)
            self._lowers.pop(rt.record.disk, None)
            rt.array_prepared = rt.record.mode == SYNC
        if failed:
            raise failed[0][1]
        take_overs, swapped = [], []
        for rt, bitmap in done:
            record = dataclasses.replace(rt.record, role=TARGET, **_swap(rt.record))
            swapped.append((rt, record))
            take_overs.append(
                messages.TakeOver(self._peer_disk(rt), record.target_address, record.port, tuple(bitmap.ranges()))
            )
        await self._save_records(swapped)
        return take_overs

    def _stop_array(self, rt: Runtime) -> Bitmap:
        """(On a thread.) Take the peer's leg out of the source's array, which stays as this
        node's prepared array for the way back; the intent bitmap it has then. An async
        mirror's array stops instead, which waits for the writes md still holds behind."""
        mirror = self._mirror(rt)
        if rt.record.mode == SYNC:
            mirror.detach()
        else:
            mirror.stop_array()
        return mirror.intent_bitmap()

    async def promote(self, disks: Sequence[str]) -> None:
        """Make this node's copies of ``disks`` the sources without the peer, as
        ``switchover`` with ``force`` does on the copy's node, all in one pass (one record
        save), but leave the kernel's target side to the caller's next commit: a failover's
        takeover serves the disks in the same reconcile that enables its targets, one
        reconcile fewer in the client's stall. What is left is for ``promoted``."""
        async with self._lock:
            await self._take_over_alone([self._target(disk) for disk in disks], serve=False)

    async def promoted(self, disks: Sequence[str]) -> None:
        """After ``promote``, once the caller serves the disks: the fenced exports' servers
        stopped and each mirror's new state reported. With 64 disks that took seconds
        under emulation: it is kept out of the clients' stall."""
        async with self._lock:
            await self._report_taken_over([self.runtime(disk) for disk in disks])

    async def _take_over_alone(self, rts: list[Runtime], serve: bool = True) -> None:
        steps = Steps()
        fenced: list[Runtime] = []
        # A new generation in the same save: from the array's start on, this node writes alone.
        sources = [
            (
                rt,
                dataclasses.replace(
                    rt.record,
                    role=SOURCE,
                    prepared=False,
                    unlocked=False,
                    generation=rt.record.generation.diverged(),
                    **_swap(rt.record),
                ),
            )
            for rt in rts
        ]
        originals = [(rt, rt.record) for rt in rts]
        try:
            await self._fence_and_save(steps, sources, fenced)
        except BaseException:
            await self._save_records(originals)
            await self._serve_again(fenced)
            raise
        await steps.run("arrays started", self._assemble_sources(rts, taking_over=True))
        for rt in rts:
            rt.reason = "took over without the peer"
        if serve:
            await steps.run("reconciled", self.engine.refresh_replication())
        log.info("%d mirror(s) taken over without the peer: %s", len(rts), describe(steps.done))
        if serve:
            await self._report_taken_over(rts)

    async def _report_taken_over(self, rts: list[Runtime]) -> None:
        await self._stop_fenced(rts)
        for rt in rts:
            await self._refresh_state(rt)
            audit("mirror-take-over", rt.record.disk, "warning", f"{rt.record.disk} taken over without the peer")

    async def _fence_and_save(
        self, steps: Steps, sources: list[tuple[Runtime, MirrorRecord]], fenced: list[Runtime]
    ) -> None:
        """Fence the copies' exports and save their records as ``sources``, side by side:
        a takeover's stall pays for the longer of the two only. The save needs no fence
        first: a daemon that stops between them finds sources at start and stops their
        exports' servers. If either fails the caller saves the old records again and serves
        the ``fenced`` copies again."""
        rts = [rt for rt, _ in sources]
        # The copies' rules, from their records before the save swaps their addresses.
        rules = {rt.record.disk: _export_rule(rt.record) for rt in rts}
        results = await asyncio.gather(
            steps.run("exports fenced", self._fence_exports(rts, rules, fenced)),
            steps.run("records saved", self._save_records(sources)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _fence_exports(self, rts: list[Runtime], rules: dict[str, PortalFilter], fenced: list[Runtime]) -> None:
        """Fence each copy's export, all at once: nothing the old source sends reaches the
        disk from now on; its leg stays, for the array. Each one done goes to ``fenced``,
        and its firewall rule (from ``rules``) stays until its server stops."""
        done, failed = await _on_threads(lambda rt: self._export(rt).fence(), rts)
        fenced.extend(rt for rt, _ in done)
        self._fenced.update((rt.record.disk, rules[rt.record.disk]) for rt, _ in done)
        if failed:
            raise failed[0][1]

    async def _serve_again(self, fenced: list[Runtime]) -> None:
        """After a takeover that failed: the copies whose exports it fenced are served
        again, their legs' tables back; a failure is logged."""
        for rt in fenced:
            self._fenced.pop(rt.record.disk, None)
        _, failed = await _on_threads(self._serve_copy, fenced)
        for rt, exc in failed:
            log.error("mirror %s: the copy could not be served again: %s", rt.record.disk, exc)

    async def _stop_fenced(self, rts: Sequence[Runtime]) -> None:
        """Stop the servers of these sources' fenced exports (idempotent), then their
        firewall rules go; a failure is logged, and tried again at the next start."""
        stopped, failed = await _on_threads(lambda rt: self._export(rt).stop_serving(), rts)
        for rt, exc in failed:
            log.warning("mirror %s: the server of its fenced export did not stop: %s", rt.record.disk, exc)
        ruled = [rt.record.disk for rt, _ in stopped if rt.record.disk in self._fenced]
        for disk in ruled:
            del self._fenced[disk]
        if ruled:
            await self.engine.refresh_replication()

    async def prepare_targets(self, disks: Sequence[str]) -> None:
        """Make this node's halves of ``disks`` the copies again after a split brain (the
        reference's PREPARETOBECOMETARGET, on the node whose changes are to be overwritten),
        all in one pass. Their bitmaps are kept: the winner's resync copies the regions this
        node changed, partially."""
        async with self._lock:
            rts = [self._source(disk, "make a target of") for disk in disks]
            self._handing_over.update(disks)
            try:
                await self.engine.refresh_replication()
                for rt in rts:
                    # Its metadata stays: its bitmap marks what the peer's resync is to overwrite.
                    await asyncio.to_thread(self._mirror(rt).stop_array)
                    rt.array_prepared = False
                    self._lowers.pop(rt.record.disk, None)
                await self._save_records(
                    [(rt, dataclasses.replace(rt.record, role=TARGET, prepared=True, **_swap(rt.record))) for rt in rts]
                )
            finally:
                self._handing_over.difference_update(disks)
            await self.engine.refresh_replication()
            # All at once: an export's server takes seconds to start in a TCG guest, and a
            # node demoted after a failover serves every protected disk's copy.
            served, failed = await _on_threads(self._serve_copy, rts)
            for rt, _ in served:
                rt.pending, rt.resync, rt.split_brain, rt.reason = False, None, False, ""
                await self._refresh_state(rt)
                audit(
                    "mirror-prepare-target",
                    rt.record.disk,
                    "ok",
                    f"{rt.record.disk} is the copy again; the peer's resync overwrites it",
                )
            if failed:
                # The records say copy: the monitor serves them once it can.
                raise failed[0][1]

    # -- the monitor -------------------------------------------------------------------

    async def _watch(self, rt: Runtime) -> None:
        if rt.record.role == TARGET:
            if not rt.record.unlocked and not self._export(rt).server_pid():
                await asyncio.to_thread(self._serve_copy, rt)
            if rt.fork_due:
                await self._withdraw_standby(rt)
            if rt.fork_due or (not rt.array_prepared and time.monotonic() >= rt.prepare_after):
                await asyncio.to_thread(self._prepare_copy, rt)
                self._standby_grew |= rt.array_prepared
            await self._refresh_state(rt)
            return
        if rt.record.disk not in self._lowers:
            return  # not assembled: start-up said why
        mirror = self._mirror(rt)
        status = await asyncio.to_thread(mirror.status)
        rt.status = status
        self._count_traffic(rt, status)
        if Intent(rt.record.intent) is Intent.MIRROR and not rt.split_brain:
            peer_leg = _peer_leg(status)
            why = ""
            if peer_leg is not None and peer_leg.faulty:
                why = "the peer's leg failed"
            elif peer_leg is not None and self._link_down() and not await self._export_answers(rt):
                why = "the peer link is down"
            elif peer_leg is not None and time.monotonic() - rt.last_check >= PEER_CHECK_SECONDS:
                why = await self._peer_still_copy(rt)
            if why:
                await asyncio.to_thread(mirror.detach)
                await self._diverge([rt], why)
                self._end_resync(rt, False, why)
            elif peer_leg is not None and rt.record.mode == ASYNC and self._queue_over(rt, status):
                await asyncio.to_thread(mirror.detach)
                await self._diverge([rt], "the async queue crossed its high-water mark")
                self._end_resync(rt, False, rt.reason)
            elif peer_leg is None and time.monotonic() - rt.last_attempt >= RESUME_SECONDS:
                await self._reconnect(rt)
        await self._refresh_state(rt)

    async def _export_answers(self, rt: Runtime) -> bool:
        """Whether the copy's NBD server still takes connections. A link that drops while
        the server answers is the peer's daemon restarting (the server outlives it): the
        leg keeps working and stays in."""
        return await asyncio.to_thread(self.data.peer_answers, self._endpoint(rt.record))

    def _link_down(self) -> bool:
        """The peer link has been down a moment (a daemon that just started waits for its
        first handshake)."""
        now = time.monotonic()
        if self.peer.connected:
            self._link_seen = now
            return False
        return now - self._link_seen > LINK_DOWN_GRACE

    async def _peer_still_copy(self, rt: Runtime) -> str:
        """Why the peer is no longer this mirror's copy, "" while it is. A copy taken over
        while this node's daemon was down is noticed here, before a write fails on its leg."""
        rt.last_check = time.monotonic()
        try:
            status = await self._peer_status(rt)
        except Unreachable:
            return ""  # the leg and the link tell when the peer is really gone
        if status.role == SOURCE:
            rt.split_brain = True
            return "split brain: the peer serves this disk too; run prepare-target on the node to overwrite"
        return "" if status.serving else "the peer does not serve its copy"

    def _queue_over(self, rt: Runtime, status: ArrayStatus | None) -> bool:
        if status is None:
            return False
        rt.queue_length = status.max_behind_used
        self._mirror(rt).reset_queue_max()
        return status.max_behind_used >= min(rt.record.tunables.high_water, MAX_WRITE_BEHIND)

    async def _reconnect(self, rt: Runtime, manual: bool = False) -> None:
        """Bring the peer's leg back if the peer and the generations allow it."""
        rt.last_attempt = time.monotonic()
        endpoint = self._endpoint(rt.record)
        if not self.peer.connected:
            rt.reason = rt.reason or "the peer link is down"
            if manual:
                rt.pending = True
            return
        try:
            status = await self._peer_status(rt)
        except Unreachable as exc:
            rt.reason = f"the peer does not answer: {exc}"
            return
        if status.role == SOURCE:
            _refuse_split_brain(
                rt, "split brain: the peer serves this disk too; run prepare-target on the node to overwrite"
            )
            return
        if status.unlocked:
            rt.reason = "the copy is unlocked for reading on the peer; continue locks it"
            return
        verdict = compare(rt.record.generation, status.generation, status.prepared)
        mirror = self._mirror(rt)
        if rt.record.full_resync:
            await asyncio.to_thread(mirror.mark_dirty, [(0, rt.volume.regions)])
        elif verdict is Verdict.MERGE:
            runs = await self._peer_bitmap(rt)
            await asyncio.to_thread(mirror.mark_dirty, runs)
        elif verdict is Verdict.SPLIT_BRAIN:
            _refuse_split_brain(
                rt, "split brain: both nodes wrote while apart; run prepare-target on the node to overwrite"
            )
            return
        elif verdict is Verdict.UNRELATED:
            _refuse_split_brain(rt, "the copy holds data of another generation; resync copies the whole disk over it")
            return
        if not await asyncio.to_thread(self.data.peer_answers, endpoint):
            rt.reason = f"the peer's export {endpoint.address}:{endpoint.port} does not answer"
            return
        if rt.passes >= rt.record.tunables.max_resync_passes:
            await self._set_intent(rt, Intent.PAUSE)
            rt.reason = f"paused after {rt.passes} resync passes: quiesce the writers, then continue"
            audit(
                "mirror-passes", rt.record.disk, "paused", f"mirror of {rt.record.disk}: {rt.reason}", logging.WARNING
            )
            return
        await self._connect(rt, endpoint)
        rt.reconnects += 0 if manual else 1

    async def _connect(self, rt: Runtime, endpoint: PeerEndpoint) -> None:
        mirror = self._mirror(rt)
        before = await asyncio.to_thread(mirror.status)
        dirty = (await asyncio.to_thread(mirror.intent_bitmap)).dirty
        await asyncio.to_thread(mirror.connect, endpoint)
        await asyncio.to_thread(mirror.set_write_behind, self._write_behind(rt.record))
        await asyncio.to_thread(mirror.set_resync_limit, rt.record.tunables.throttle // 8)
        rt.passes += 1
        rt.pending, rt.reason = False, ""
        # A new NBD device counts its writes from zero: the resync's traffic is all counted.
        rt._last_written = (time.monotonic(), 0)
        rt.resync = ResyncProgress(
            started=time.time(),
            total_regions=rt.volume.regions,
            dirty_regions=dirty,
            start_writes=_writes(before),
        )
        self._notify(rt.record.disk, "resync-started")
        rt.status = await asyncio.to_thread(mirror.status)
        await self._refresh_state(rt)

    async def _refresh_state(self, rt: Runtime) -> None:
        """Work out the state; a resync that completed is reported to the copy."""
        before = rt.state
        if rt.record.role == TARGET:
            rt.state = MirrorState.MIRRORING if Intent(rt.record.intent) is Intent.MIRROR else MirrorState.PAUSED
        else:
            rt.state = mirror_state(rt.status, Intent(rt.record.intent), rt.pending)
            if rt.resync is not None and rt.status is not None:
                rt.resync.synced_sectors, rt.resync.sync_sectors = rt.status.synced, rt.status.sync_total
                rt.resync.rate = rt.status.sync_speed * 1024
            if rt.state is MirrorState.MIRRORING and (rt.resync is not None or rt.record.generation.bitmap):
                await self._synced(rt)
        if rt.state is not before:
            rt.since = time.time()
            log.info(
                "mirror %s: %s, %s%s",
                rt.record.disk,
                rt.record.role,
                rt.state.name.lower(),
                f" ({rt.reason})" if rt.reason else "",
                extra={"OPERATION": "mirror-state", "OBJECT": rt.record.disk, "OUTCOME": rt.state.name.lower()},
            )
            self._notify(rt.record.disk)

    async def _synced(self, rt: Runtime) -> None:
        generation = rt.record.generation
        try:
            await self._ask(messages.SYNCED, messages.Synced(self._peer_disk(rt), generation), messages.Done)
        except Unreachable:
            return  # told at the next look
        await self._save_record(
            rt, dataclasses.replace(rt.record, generation=generation.caught_up(), full_resync=False)
        )
        rt.passes = 0
        self._end_resync(rt, True, "the copy is in sync")

    def _end_resync(self, rt: Runtime, success: bool, message: str) -> None:
        if rt.resync is None:
            return
        rt.resync = None
        self._notify(rt.record.disk, "resync-completed" if success else "resync-failed")
        log.info("mirror %s: resync %s: %s", rt.record.disk, "completed" if success else "stopped", message)

    async def _diverge(self, rts: Sequence[Runtime], why: str) -> None:
        """This node writes these mirrors without the peer from now on: a new generation
        each (one record save), and why."""
        changes = []
        for rt in rts:
            rt.reason = why
            diverged = rt.record.generation.diverged()
            if diverged != rt.record.generation:
                changes.append((rt, dataclasses.replace(rt.record, generation=diverged)))
        if not changes:
            return
        await self._save_records(changes)
        for rt, _ in changes:
            audit(
                "mirror-paused", rt.record.disk, "paused", f"mirror of {rt.record.disk} paused: {why}", logging.WARNING
            )

    def _count_traffic(self, rt: Runtime, status: ArrayStatus | None) -> None:
        peer_leg = _peer_leg(status)
        if peer_leg is None or peer_leg.faulty:
            rt.throughput, rt._last_written = 0, None
            return
        written = _sectors_written(peer_leg.name) * 512
        now = time.monotonic()
        if rt._last_written is not None:
            at, last = rt._last_written
            if written >= last:
                rt.bytes_replicated += written - last
                rt.throughput = int((written - last) / max(now - at, 1e-3))
        rt._last_written = (now, written)

    # -- what the peer asks (this node holds the copy) --------------------------------

    def _handlers(self) -> dict[str, Callable[[bytes], Awaitable[bytes]]]:
        def handler(
            schema: type[T], method: Callable[[T], Awaitable[Any]], locked: bool = True
        ) -> Callable[[bytes], Awaitable[bytes]]:
            async def handle(body: bytes) -> bytes:
                message = messages.unpack(body, schema)
                if not locked:
                    return messages.pack(await method(message))
                async with self._lock:
                    return messages.pack(await method(message))

            return handle

        return {
            messages.PREPARE: handler(messages.Prepare, self._on_prepare),
            # A read of the record, which changes in one assignment: it never waits for a
            # change in progress, so the peer can tell "busy" from "gone".
            messages.STATUS: handler(messages.Disk, self._on_status, locked=False),
            messages.SYNCED: handler(messages.Synced, self._on_synced),
            messages.UPDATE: handler(messages.Update, self._on_update),
            messages.RELEASE: handler(messages.Release, self._on_release),
            messages.UNLOCK: handler(messages.Disk, self._on_unlock),
            messages.LOCK: handler(messages.Disk, self._on_lock),
            messages.BITMAP: handler(messages.BitmapPart, self._on_bitmap),
            messages.TAKE_OVER: handler(messages.TakeOvers, self._on_take_over),
            messages.GROW: handler(messages.Grow, self._on_grow),
        }

    async def _on_prepare(self, ask: messages.Prepare) -> messages.Prepared:
        source_address = self._pair_record()
        name = ask.existing or ask.disk
        existing = self.mirrors.get(name)
        if existing is not None:
            if existing.record.role == TARGET and existing.record.generation.current == ask.generation.current:
                return messages.Prepared(existing.record.port, existing.record.generation, source_address)
            raise AlreadyExists(f"disk {name!r} of {self._local_name()} is mirrored already")
        disk = self.engine.config.disks.get(name)
        if ask.existing:
            disk = await self._checked_copy(ask, disk)
        elif disk is not None:
            raise AlreadyExists(
                f"{self._local_name()} has a disk {name!r} already; name it as the copy or pick another"
            )
        port = self._free_port()
        record = MirrorRecord(
            disk=name,
            role=TARGET,
            mode=ask.mode,
            source_address=source_address,
            target_address=ask.target_address,
            port=port,
            size=ask.size,
            region=ask.region,
            generation=ask.generation,
            tunables=ask.tunables,
            created=ask.created,
            peer_disk=ask.disk,
            made=disk is None,
        )
        made = disk is None
        # Locked before the copy exists or is taken: it is never served.
        rt = Runtime(record, Volume(name, "", True, ask.size, ask.region))
        self.mirrors[name] = rt
        try:
            if made:
                disk = await self.engine.create_disk(
                    name, ask.size, serial=ask.serial, description=f"mirror copy from {source_address}"
                )
            else:
                await self.engine.refresh_replication()
                await self.engine.set_disk_serial(name, ask.serial)
            rt.volume = self._volume(disk, ask.size, ask.region)
            await asyncio.to_thread(self.data.prepare)
            await asyncio.to_thread(self._export(rt).assemble, ask.target_address, port, True)
            await self._save()
            await self.engine.refresh_replication()  # the export's firewall rule
        except BaseException:
            self.mirrors.pop(name, None)
            if rt.volume.path:
                await asyncio.to_thread(self._export(rt).disassemble)
            if made and disk is not None:
                await self.engine.delete_disk(name, remove_file=True)
            await self.engine.refresh_replication()
            raise
        audit("mirror-copy", name, "ok", f"{name} is the copy of {source_address}'s disk {ask.disk}")
        self._notify(name, "created")
        return messages.Prepared(port, ask.generation, source_address)

    async def _checked_copy(self, ask: messages.Prepare, disk: Disk | None) -> Disk:
        name = ask.existing
        if disk is None:
            raise NotFound(f"{self._local_name()} has no disk {name!r}")
        if disk.size < ask.size:
            raise InvalidArgument(f"disk {name!r} of {self._local_name()} is smaller than {ask.disk!r}")
        if disk.backstore != "dm":
            raise NotSupported(f"disk {name!r} of {self._local_name()} has a direct backstore; convert it first")
        exporters = [t.name for t in self.engine.config.targets.values() if any(lun.disk == name for lun in t.luns)]
        if exporters:
            raise Busy(f"disk {name!r} of {self._local_name()} is exported by {', '.join(exporters)}")
        if name in self.engine.missing:
            raise NotSupported(f"disk {name!r} of {self._local_name()} is missing")
        return disk

    async def _on_status(self, ask: messages.Disk) -> messages.Status:
        rt = self.runtime(ask.disk)
        serving = rt.record.role == TARGET and bool(self._export(rt).server_pid())
        return messages.Status(
            rt.record.role, rt.record.generation, serving, rt.record.prepared, rt.record.unlocked, rt.record.port
        )

    async def _on_synced(self, ask: messages.Synced) -> messages.Done:
        rt = self._target(ask.disk)
        synced = rt.record.generation.synced_to(ask.generation)
        if synced.current != rt.record.generation.current or rt.record.prepared:
            await self._save_record(rt, dataclasses.replace(rt.record, generation=synced, prepared=False))
            self._notify(ask.disk)
        rt.fork_due = True  # by the monitor: the source waits for this answer
        return messages.Done()

    async def _on_update(self, ask: messages.Update) -> messages.Done:
        rt = self._target(ask.disk)
        moved = ask.target_address != rt.record.target_address
        # The export's firewall rule names both addresses; nothing else the update carries
        # (mode, intent, tunables) is in this node's kernel, and a reconcile of 64 LUNs
        # holds the lock 1-2.5 s on an emulated node, for every continue after a failback.
        readdressed = moved or ask.source_address != rt.record.source_address
        updated = dataclasses.replace(
            rt.record,
            mode=ask.mode,
            intent=ask.intent,
            tunables=ask.tunables,
            source_address=ask.source_address,
            target_address=ask.target_address,
        )
        if moved:
            await asyncio.to_thread(self._export(rt).disassemble)
        await self._save_record(rt, updated)
        if moved:
            rt.volume = self._volume(self.engine.config.disks[ask.disk], rt.record.size, rt.record.region)
            await asyncio.to_thread(self._export(rt).assemble, updated.target_address, updated.port)
        if readdressed:
            await self.engine.refresh_replication()
        await self._refresh_state(rt)
        return messages.Done()

    async def _on_release(self, ask: messages.Release) -> messages.Done:
        rt = self.mirrors.get(ask.disk)
        if rt is None or rt.record.role != TARGET:
            return messages.Done()  # released already (a retry, or an undone create)
        await self._withdraw_standby(rt)
        await asyncio.to_thread(self._drop_copy, rt)
        await asyncio.to_thread(self.data.release, rt.volume)
        del self.mirrors[ask.disk]
        await self._save()
        await self.engine.refresh_replication()  # unlocked: the disk device and backstore come back
        if ask.discard and rt.record.made:
            # The mirror was never made: the copy made for it goes too.
            await self.engine.delete_disk(ask.disk, remove_file=True)
            audit("mirror-release", ask.disk, "ok", f"the copy {ask.disk} made for a mirror that failed is removed")
        else:
            await self.engine.set_disk_serial(ask.disk)
            audit("mirror-release", ask.disk, "ok", f"{ask.disk} is a disk of its own again (the mirror was deleted)")
        self._notify(ask.disk, "deleted")
        return messages.Done()

    async def _on_unlock(self, ask: messages.Disk) -> messages.Unlocked:
        rt = self._target(ask.disk)
        node = await asyncio.to_thread(self._export(rt).unlock_read_only)
        await self._save_record(rt, dataclasses.replace(rt.record, unlocked=True))
        return messages.Unlocked(node)

    async def _on_lock(self, ask: messages.Disk) -> messages.Done:
        rt = self._target(ask.disk)
        try:
            await asyncio.to_thread(self._export(rt).lock)
        except KernelError as exc:
            raise Busy(str(exc)) from None
        await self._save_record(rt, dataclasses.replace(rt.record, unlocked=False))
        await asyncio.to_thread(self._serve_copy, rt)
        return messages.Done()

    async def _on_bitmap(self, ask: messages.BitmapPart) -> messages.BitmapRuns:
        rt = self._target(ask.disk)
        found = await asyncio.to_thread(self._export(rt).intent_bitmap)
        runs = found.ranges()
        start = ask.part * messages.RUNS_PER_PART
        part = tuple(runs[start : start + messages.RUNS_PER_PART])
        return messages.BitmapRuns(found.region, found.regions, part, start + messages.RUNS_PER_PART < len(runs))

    async def _on_grow(self, ask: messages.Grow) -> messages.Done:
        rt = self._target(ask.disk)
        if rt.record.size >= ask.size:
            return messages.Done()  # grown already (a retry)
        export = self._export(rt)
        await self._withdraw_standby(rt)

        async def grow_layers(grown: Disk) -> None:
            # The prepared array has the old size: the monitor forks it anew, at the new one.
            await asyncio.to_thread(self._mirror(rt).discard)
            rt.array_prepared = False
            await asyncio.to_thread(export.grow, ask.size)

        await self.engine.extend_disk(ask.disk, ask.size, mirror=grow_layers)
        rt.volume = self._volume(self.engine.config.disks[ask.disk], ask.size, rt.record.region)
        await self._save_record(rt, dataclasses.replace(rt.record, size=ask.size))
        await asyncio.to_thread(self._serve_copy, rt)
        return messages.Done()

    async def _on_take_over(self, ask: messages.TakeOvers) -> messages.Done:
        """Become the source of every disk asked, or of none (the old source then serves
        them all again)."""
        wanted = [(self.runtime(item.disk), item) for item in ask.disks]
        # Those taken over already are left as they are (a retry).
        wanted = [(rt, item) for rt, item in wanted if rt.record.role != SOURCE]
        originals = [(rt, rt.record) for rt, _ in wanted]
        fenced: list[Runtime] = []  # whose export is fenced: their leg is this node's array now
        steps = Steps()
        try:
            await self._fence_and_save(
                steps,
                [
                    (
                        rt,
                        dataclasses.replace(
                            rt.record,
                            role=SOURCE,
                            source_address=rt.record.target_address,
                            target_address=item.source_address,
                            port=item.port,
                        ),
                    )
                    for rt, item in wanted
                ],
                fenced,
            )
            await steps.run("arrays assembled", self._assemble_taken_over(wanted))
        except BaseException:
            # Still the copies: served again for the source, which takes them back; the
            # arrays that started stay, as prepared arrays.
            for rt in fenced:
                self._lowers.pop(rt.record.disk, None)
            await self._save_records(originals)
            await self._serve_again(fenced)
            raise
        await steps.run("reconciled", self.engine.refresh_replication(read_back=False))
        for rt, item in wanted:
            rt.pending = True
            audit(
                "mirror-take-over",
                rt.record.disk,
                "ok",
                f"{rt.record.disk} is served here now; {item.source_address} holds the copy",
            )
        log.info("%d mirror(s) taken over from the peer: %s", len(wanted), describe(steps.done))
        # The monitor adds the old source's legs within seconds, and the fenced exports'
        # servers stop later: the answer, in the switchover's stall, waits for neither.
        stopping = asyncio.ensure_future(self._stop_fenced_later(fenced))
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        stopping.add_done_callback(log_failure(log, "the fenced exports' servers were not stopped"))
        return messages.Done()

    async def _stop_fenced_later(self, rts: list[Runtime]) -> None:
        await asyncio.sleep(FENCED_SERVERS_LINGER)
        async with self._lock:  # not under a switchover back that serves the copies again
            await self._stop_fenced([rt for rt in rts if rt.record.role == SOURCE])

    async def _assemble_taken_over(self, wanted: list[tuple[Runtime, messages.TakeOver]]) -> None:
        """Each prepared array started, all at once, with the old source's dirty regions
        marked."""
        done, failed = await _on_threads(self._start_taken_over, wanted)
        for (rt, _), _ in done:
            self._lowers[rt.record.disk] = self._mirror(rt).node
        if failed:
            raise failed[0][1]

    def _start_taken_over(self, wanted: tuple[Runtime, messages.TakeOver]) -> None:
        """(On a thread.) The array of a copy taken over, with both sides' dirty regions
        marked (its own are in its bitmap)."""
        rt, item = wanted
        rt.array_prepared = rt.fork_due = False
        self._mirror(rt).take_over(self._write_behind(rt.record), item.dirty)

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _peer_disk(rt: Runtime) -> str:
        """The mirrored disk's name on the peer node, which requests name."""
        return rt.record.peer_disk or rt.record.disk

    def _source(self, disk: str, what: str) -> Runtime:
        rt = self.runtime(disk)
        if rt.record.role != SOURCE:
            raise NotSupported(
                f"this node holds the copy of {disk!r}; {what} the mirror on the source ({rt.record.source_address})"
            )
        return rt

    def _target(self, disk: str) -> Runtime:
        rt = self.runtime(disk)
        if rt.record.role != TARGET:
            raise NotSupported(f"{self._local_name()} is the source of {disk!r}, not its copy")
        return rt

    def _mirror(self, rt: Runtime) -> Mirror:
        return self.data.mirror(rt.volume)

    def _export(self, rt: Runtime) -> Export:
        return self.data.export(rt.volume)

    def _serve_copy(self, rt: Runtime) -> None:
        """(On a thread.) Serve the copy to the source, at the record's address and port."""
        self._export(rt).assemble(rt.record.target_address, rt.record.port)

    def _start_copy(self, rt: Runtime) -> None:
        """(On a thread.) At start: the copy served, and its prepared array adopted if it
        runs, so that the first reconcile keeps the LUNs made over it in advance."""
        self._serve_copy(rt)
        rt.array_prepared = self._mirror(rt).adopt() is not None

    def _prepare_copy(self, rt: Runtime) -> None:
        """(On a thread.) The copy's prepared array adopted, or forked (anew once reported in
        sync): ``Mirror.prepare``. Without one the copy is still served, and a takeover
        starts its array then, as it would have to anyway."""
        fresh, rt.fork_due = rt.fork_due, False
        try:
            rt.array_prepared = self._mirror(rt).prepare(fresh) is not None
        except KernelError as exc:
            rt.array_prepared = False
            rt.prepare_after = time.monotonic() + PREPARE_RETRY_SECONDS
            log.warning("mirror %s: the copy has no prepared array (%s); a takeover starts it", rt.record.disk, exc)

    async def _withdraw_standby(self, *rts: Runtime) -> None:
        """Before copies' prepared arrays stop: the LUNs made over them in advance (which
        hold them open) go, all in one reconcile. If it fails they count as made still."""
        prepared = [rt for rt in rts if rt.array_prepared]
        if not prepared:
            return
        for rt in prepared:
            rt.array_prepared = False
        try:
            await self.engine.refresh_replication()
        except BaseException:
            for rt in prepared:
                rt.array_prepared = True
            raise

    def _drop_copy(self, rt: Runtime) -> None:
        """(On a thread.) The copy neither served nor prepared: a plain disk again."""
        self._mirror(rt).stop()
        self._export(rt).disassemble()

    def _endpoint(self, record: MirrorRecord) -> PeerEndpoint:
        return PeerEndpoint(record.target_address, record.peer_disk or record.disk, record.port, timeout=NBD_TIMEOUT)

    @staticmethod
    def _volume(disk: Disk, size: int, region: int) -> Volume:
        return Volume(disk.name, disk.path, disk.kind == "file", size, region)

    def _write_behind(self, record: MirrorRecord) -> int:
        # A little above the high-water mark: the monitor pauses the mirror before md
        # would hold writers back.
        return 0 if record.mode == SYNC else min(record.tunables.high_water + 64, MAX_WRITE_BEHIND)

    def _pair_record(self) -> str:
        """The peer's address (the pair's main path); Unreachable if not paired or not connected."""
        if self.peer.record is None:
            raise NotSupported("this node is not paired: pair it with its peer first")
        if not self.peer.connected:
            raise Unreachable(f"the peer {self.peer.record.peer_address} is not connected")
        return self.peer.record.peer_address

    def _local_name(self) -> str:
        return f"node {self.engine.config.node_id[:8]}"

    def _free_port(self) -> int:
        used = {rt.record.port for rt in self.mirrors.values()}
        return next(port for port in range(DEFAULT_PORT, 65536) if port not in used)

    async def _set_intent(self, rt: Runtime, intent: Intent) -> None:
        await self._save_record(rt, dataclasses.replace(rt.record, intent=intent.value))

    async def _save_record(self, rt: Runtime, record: MirrorRecord) -> None:
        await self._save_records([(rt, record)])

    async def _save_records(self, changes: list[tuple[Runtime, MirrorRecord]]) -> None:
        """Give each runtime its new record, in one write; none of them if it fails."""
        previous = [(rt, rt.record) for rt, _ in changes]
        for rt, record in changes:
            rt.record = record
        try:
            await self._save()
        except BaseException:
            for rt, record in previous:
                rt.record = record
            raise

    async def _save(self) -> None:
        """Write the records; the throttles follow them (a tune, a mirror made or gone, a role swapped)."""
        await asyncio.to_thread(self.store.save, {name: rt.record for name, rt in self.mirrors.items()})
        await self._throttle()

    async def _throttle(self) -> None:
        # Unthrottled mirrors make no rule: a takeover's record save swaps roles, and tc's
        # processes would cost it a fraction of a second under emulation for nothing.
        limits = [
            throttle.Limit(rt.record.target_address, rt.record.port, rt.record.tunables.throttle)
            for rt in self.mirrors.values()
            if rt.record.role == SOURCE and rt.record.tunables.throttle > 0
        ]
        if limits != self._throttled:
            await asyncio.to_thread(self.data.throttle, limits)
            self._throttled = limits

    async def _update_peer(self, rt: Runtime, best_effort: bool = False) -> None:
        record = rt.record
        update = messages.Update(
            self._peer_disk(rt),
            record.mode,
            record.intent,
            record.tunables,
            record.source_address,
            record.target_address,
        )
        try:
            await self._ask(messages.UPDATE, update, messages.Done)
        except Unreachable:
            if not best_effort:
                raise

    async def _peer_bitmap(self, rt: Runtime) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        part = 0
        while True:
            answer = await self._ask(
                messages.BITMAP, messages.BitmapPart(self._peer_disk(rt), part), messages.BitmapRuns
            )
            if (answer.regions, answer.region) != (rt.volume.regions, rt.record.region):
                raise InvalidArgument(f"the peer's bitmap of {rt.record.disk!r} covers other regions")
            runs += answer.runs
            if not answer.more:
                return runs
            part += 1

    async def _peer_status(self, rt: Runtime) -> messages.Status:
        """The peer's half of ``rt`` as its record has it; answered without waiting for the
        peer's lock, so quickly or not at all."""
        return await self._ask(messages.STATUS, messages.Disk(self._peer_disk(rt)), messages.Status, QUICK_REQUEST)

    async def _ask(self, kind: str, message: object, answer: type[T], timeout: float = SLOW_REQUEST) -> T:
        """The peer's answer to a request, its refusals raised as the same named errors."""
        return messages.unpack(await self.peer.ask(kind, messages.pack(message), timeout), answer)


def _swap(record: MirrorRecord) -> dict[str, str]:
    return {"source_address": record.target_address, "target_address": record.source_address}


async def _on_threads(
    work: Callable[[W], T], items: Sequence[W]
) -> tuple[list[tuple[W, T]], list[tuple[W, BaseException]]]:
    """Run the blocking ``work`` for each item (one per disk) on threads at once, and wait
    for all of them: the items done, each with its result, and those failed, each with its
    error. md starts arrays side by side (in a TCG guest 0.15 s each on eight threads,
    against 0.33 s one after the other), so a takeover's stall pays for the slowest disks,
    not for the sum."""
    results = await asyncio.gather(*(asyncio.to_thread(work, item) for item in items), return_exceptions=True)
    paired = list(zip(items, results, strict=True))
    done = [(item, result) for item, result in paired if not isinstance(result, BaseException)]
    failed = [(item, result) for item, result in paired if isinstance(result, BaseException)]
    return done, failed


def _export_rule(record: MirrorRecord) -> PortalFilter:
    """The firewall rule of the export of a copy's ``record``: only its source may connect."""
    return export_filter(record.target_address, record.port, record.source_address)


def _connected(leg: Leg) -> bool:
    """Whether ``leg`` is the peer's, working."""
    return leg.name.startswith("nbd") and not leg.faulty


def _peer_leg(status: ArrayStatus | None) -> Leg | None:
    if status is None:
        return None
    return next((leg for leg in status.legs if leg.name.startswith("nbd")), None)


def _writes(status: ArrayStatus | None) -> int:
    """Writes the array completed since it started (the reference's "new writes" count)."""
    return _block_stat(status.name, 4) if status else 0


def _sectors_written(block: str) -> int:
    return _block_stat(block, 6)


def _block_stat(block: str, field: int) -> int:
    """One field of a block device's /sys/block/<name>/stat (4: writes, 6: sectors written)."""
    try:
        return int((Path("/sys/block") / block / "stat").read_text().split()[field])
    except (OSError, IndexError, ValueError):
        return 0


def _unicast(address: str, what: str) -> str:
    canonical = canonical_address(address)
    parsed = ipaddress.ip_address(canonical)
    if parsed.is_unspecified or parsed.is_multicast:
        raise InvalidArgument(f"{what} {address} is not a unicast address")
    return canonical


def _refuse_unless_mirroring(rt: Runtime) -> None:
    if rt.state is not MirrorState.MIRRORING:
        raise Busy(f"the mirror of {rt.record.disk!r} is {rt.state.name.lower()}: only a mirroring copy can take over")


def _refuse_split_brain(rt: Runtime, why: str) -> None:
    """Keep the mirror paused, flagged and saying why: two diverged copies are never
    resolved silently."""
    rt.split_brain = True
    rt.reason = why
    audit("mirror-split-brain", rt.record.disk, "refused", f"mirror of {rt.record.disk}: {rt.reason}", logging.ERROR)
