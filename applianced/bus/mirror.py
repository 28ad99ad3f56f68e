"""The D-Bus objects of replication: one per mirror, and one Job per running resync.

A mirror's object (``…/mirrors/<disk>``) carries its settings and state as properties,
announced with PropertiesChanged when replication reports a change, and its counters as
one live property read when asked. A resync is a Job (``…/jobs/<n>``, as udisks2 has
them): progress, rate and time left while it runs, a ``Completed(b success, s message)``
signal when it ends, after which the object goes away.
"""

import itertools
import time

from dbus_fast import PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, signal

from applianced.bus import paths
from applianced.bus.announcing import AnnouncingInterface
from applianced.bus.errors import translate_errors
from applianced.bus.options import Options
from applianced.constants import JOB_INTERFACE, MIRROR_INTERFACE
from applianced.replication.service import Replication, Runtime

READ = PropertyAccess.READ
NO_JOB = "/"
TUNABLES = {"high_water": "u", "low_water": "u", "throttle": "u", "max_resync_passes": "u"}


class MirrorInterface(AnnouncingInterface):
    """One mirror, as this node sees it (source or target)."""

    def __init__(self, replication: Replication, disk: str) -> None:
        super().__init__(MIRROR_INTERFACE)
        self.replication = replication
        self.disk = disk
        self.job = NO_JOB
        self.start_announcing()

    @property
    def _rt(self) -> Runtime:
        return self.replication.runtime(self.disk)

    @dbus_property(access=READ)
    def Disk(self) -> "o":
        return paths.disk_path(self.disk)

    @dbus_property(access=READ)
    def Role(self) -> "s":
        return self._rt.record.role

    @dbus_property(access=READ)
    def Mode(self) -> "s":
        return self._rt.record.mode

    @dbus_property(access=READ)
    def State(self) -> "u":
        return int(self._rt.state)

    @dbus_property(access=READ)
    def StateName(self) -> "s":
        return self._rt.state.name.lower().replace("_", " ")

    @dbus_property(access=READ)
    def Intent(self) -> "s":
        """What the administrator asked: mirror, pause or break."""
        return self._rt.record.intent

    @dbus_property(access=READ)
    def Reason(self) -> "s":
        return self._rt.reason

    @dbus_property(access=READ)
    def StateSince(self) -> "d":
        return self._rt.since

    @dbus_property(access=READ)
    def PeerAddress(self) -> "s":
        return self._rt.record.peer_address

    @dbus_property(access=READ)
    def SourceAddress(self) -> "s":
        return self._rt.record.source_address

    @dbus_property(access=READ)
    def TargetAddress(self) -> "s":
        return self._rt.record.target_address

    @dbus_property(access=READ)
    def Port(self) -> "q":
        return self._rt.record.port

    @dbus_property(access=READ)
    def Size(self) -> "t":
        return self._rt.record.size

    @dbus_property(access=READ)
    def Region(self) -> "u":
        return self._rt.record.region

    @dbus_property(access=READ)
    def Tunables(self) -> "a{su}":
        tunables = self._rt.record.tunables
        return {name: getattr(tunables, name) for name in TUNABLES}

    @dbus_property(access=READ)
    def Generation(self) -> "(sss)":
        generation = self._rt.record.generation
        return [generation.current, generation.bitmap, ",".join(generation.history)]

    @dbus_property(access=READ)
    def SplitBrain(self) -> "b":
        return self._rt.split_brain

    @dbus_property(access=READ)
    def Unlocked(self) -> "b":
        return self._rt.record.unlocked

    @dbus_property(access=READ)
    def Job(self) -> "o":
        return self.job

    @dbus_property(access=READ)
    def Counters(self) -> "a{sv}":
        return {name: _variant(value) for name, value in self.replication.counters(self.disk).items()}

    @dbus_method()
    @translate_errors
    async def Pause(self, options: "a{sv}") -> "s":
        opts = Options("Pause", options, {"unlock": "b"})
        return await self.replication.pause(self.disk, opts.get("unlock", False))

    @dbus_method()
    @translate_errors
    async def Continue(self, options: "a{sv}") -> None:
        Options("Continue", options, {})
        await self.replication.resume(self.disk)

    @dbus_method()
    @translate_errors
    async def Break(self, options: "a{sv}") -> None:
        Options("Break", options, {})
        await self.replication.break_mirror(self.disk)

    @dbus_method()
    @translate_errors
    async def Resync(self, options: "a{sv}") -> None:
        Options("Resync", options, {})
        await self.replication.resync(self.disk)

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"local_only": "b"})
        await self.replication.delete(self.disk, opts.get("local_only", False))

    @dbus_method()
    @translate_errors
    async def Switchover(self, options: "a{sv}") -> None:
        opts = Options("Switchover", options, {"force": "b"})
        await self.replication.switchover(self.disk, opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def Grow(self, size: "t", options: "a{sv}") -> None:
        Options("Grow", options, {})
        await self.replication.grow(self.disk, size)

    @dbus_method()
    @translate_errors
    async def PrepareTarget(self, options: "a{sv}") -> None:
        Options("PrepareTarget", options, {})
        await self.replication.prepare_targets([self.disk])

    @dbus_method()
    @translate_errors
    async def SetMode(self, mode: "s", options: "a{sv}") -> None:
        Options("SetMode", options, {})
        await self.replication.set_mode(self.disk, mode)

    @dbus_method()
    @translate_errors
    async def SetEndpoints(self, source_address: "s", target_address: "s", options: "a{sv}") -> None:
        Options("SetEndpoints", options, {})
        await self.replication.set_endpoints(self.disk, source_address, target_address)

    @dbus_method()
    @translate_errors
    async def Tune(self, settings: "a{sv}", options: "a{sv}") -> None:
        values = Options("Tune", settings, TUNABLES).values()
        Options("Tune", options, {})
        await self.replication.tune(self.disk, **values)


class JobInterface(ServiceInterface):
    """A resync while it runs; the object goes away after ``Completed``."""

    def __init__(self, replication: Replication, disk: str) -> None:
        super().__init__(JOB_INTERFACE)
        self.replication = replication
        self.disk = disk
        self.started = time.time()

    def _progress(self) -> tuple[int, int, int]:
        """Bytes done, bytes to do, bytes per second (from the last look at the array)."""
        rt = self.replication.mirrors.get(self.disk)
        resync = rt.resync if rt else None
        if resync is None or not resync.sync_sectors:
            return 0, 0, 0
        return resync.synced_sectors * 512, resync.sync_sectors * 512, resync.rate

    @dbus_property(access=READ)
    def Operation(self) -> "s":
        return "resync"

    @dbus_property(access=READ)
    def Object(self) -> "o":
        return paths.mirror_path(self.disk)

    @dbus_property(access=READ)
    def Started(self) -> "d":
        return self.started

    @dbus_property(access=READ)
    def Progress(self) -> "d":
        done, total, _ = self._progress()
        return done / total if total else 0.0

    @dbus_property(access=READ)
    def BytesDone(self) -> "t":
        return self._progress()[0]

    @dbus_property(access=READ)
    def BytesTotal(self) -> "t":
        return self._progress()[1]

    @dbus_property(access=READ)
    def Rate(self) -> "t":
        return self._progress()[2]

    @dbus_property(access=READ)
    def Eta(self) -> "d":
        """Seconds left at the current rate; -1 while unknown."""
        done, total, rate = self._progress()
        return (total - done) / rate if rate and total else -1.0

    @signal()
    def Completed(self, success: bool, message: str) -> "bs":
        return [success, message]


class MirrorObjects:
    """Keeps the mirror and job objects in step with replication's events."""

    def __init__(self, bus: MessageBus, replication: Replication) -> None:
        self.bus = bus
        self.replication = replication
        self.mirrors: dict[str, MirrorInterface] = {}
        self.jobs: dict[str, tuple[str, JobInterface]] = {}
        self._numbers = itertools.count(1)
        for disk in replication.mirrors:
            self._export(disk)
        replication.add_listener(self.changed)

    def _export(self, disk: str) -> None:
        self.mirrors[disk] = MirrorInterface(self.replication, disk)
        self.bus.export(paths.mirror_path(disk), self.mirrors[disk])

    def changed(self, disk: str, event: str) -> None:
        if event == "deleted":
            self._end_job(disk, False, "the mirror was deleted")
            exported = self.mirrors.pop(disk, None)
            if exported is not None:
                self.bus.unexport(paths.mirror_path(disk), exported)
            return
        if disk not in self.replication.mirrors:
            return
        if disk not in self.mirrors:
            self._export(disk)
        if event == "resync-started":
            self._end_job(disk, False, "another resync started")
            path = paths.job_path(next(self._numbers))
            job = JobInterface(self.replication, disk)
            self.bus.export(path, job)
            self.jobs[disk] = (path, job)
            self.mirrors[disk].job = path
        elif event in ("resync-completed", "resync-failed"):
            rt = self.replication.mirrors[disk]
            self._end_job(disk, event == "resync-completed", rt.reason or "the copy is in sync")
        self.mirrors[disk].refresh()

    def _end_job(self, disk: str, success: bool, message: str) -> None:
        ended = self.jobs.pop(disk, None)
        if ended is None:
            return
        path, job = ended
        job.Completed(success, message)
        self.bus.unexport(path, job)
        if disk in self.mirrors:
            self.mirrors[disk].job = NO_JOB


def _variant(value: int | float | str) -> Variant:
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, float):
        return Variant("d", value)
    return Variant("t", value)
