"""The replication data path on one node: md raid1 over the local disk and the peer's copy.

On the **source** node (the one initiators write to)::

    applianced-disk-<name>     linear over the array (the target service's disk device,
                               re-pointed under LIO's live backstore)
    /dev/mdN                   raid1: leg 0 = applianced-leg-<name>, leg 1 = /dev/nbdK
                               (write-mostly: reads stay local)
    applianced-leg-<name>      linear: 1 MiB of metadata (a file's loop device), then the disk
    /dev/nbdK                  the kernel's NBD client, connected to the peer's export

On the **target** node (the peer's copy, locked: nothing else may open it)::

    applianced-export-<name>   linear: 1 MiB of metadata (the source's array writes its
                               superblock and bitmap there), then the copy; served by
                               qemu-nbd to the source only
    /dev/mdM                   the copy's own raid1, *prepared*: leg 0 = applianced-leg-<name>
                               ([its own metadata][the same copy]), the peer's leg missing;
                               idle, ready to serve

The prepared array is what makes a takeover a role change: md starting an array cost a
third of a second per disk under emulation, most of a 64-disk takeover's stall; a copy
whose array already runs only stops its export and marks the regions the source's bitmap
marked in the export's metadata. The copy forks it from that metadata (the source's
superblock, copied to its own metadata file with the bitmap's bits cleared) when it has
none and each time it is reported in sync; in between, a node that was the source keeps
its own metadata, whose bitmap marks what it wrote that the source may lack. Two arrays of
one lineage then live on two nodes, each with its own event count: a leg goes back into an
array with a superblock made from the array's own (``md.member_superblock``), which md
re-adds and recovers from the bitmap, as it does for any member that left.

Why md raid1 and this shape (measured choices are in the README):

- md's superblock (version 1.2, 4 KiB in) and its write-intent bitmap live in the first
  MiB of each leg, which is a metadata file of its own; the data starts at 1 MiB
  (``--data-offset``), which is sector 0 of the disk. So a disk that initiators already
  use is mirrored as it is, keeps its content, and is a plain disk again when the mirror
  goes. Both legs carry the bitmap, so either node can take over and resync partially.
- md, unlike dm-raid, can be steered live through sysfs: write-behind on or off (async or
  sync mode), the resync speed limit, and regions marked dirty by hand
  (``bitmap_set_bits``), which is how an initial sync skips the holes of a sparse file and
  how a switchover or split-brain recovery merges the other side's bitmap.
- The peer's leg is added by "re-add": md copies only the regions its bitmap marks. A new
  mirror is made with both legs declared in sync (``--assume-clean``), then its peer leg is
  taken out, the regions to copy are marked, and the leg goes back in: the copy runs from
  the local leg to the peer's, never the other way, and only where there is data.
- md's bad-block log is left off both legs (``--update=no-bbl``): with it, md records
  failed writes to a dead NBD leg sector by sector instead of failing the leg.
- The NBD client fails the peer's leg after its I/O timeout; md goes on with the local leg
  (writers see no error) and the bitmap records what the peer misses.
- qemu-nbd serves with ``--cache=none`` (O_DIRECT) and advertises FLUSH and FUA, so no write
  is acknowledged from the peer's page cache; it runs detached, so the data path keeps going
  while applianced restarts, and assembling again adopts what runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from applianced.blockdev import dm, loop, md, nbd, tools
from applianced.errors import InvalidArgument, KernelError
from applianced.iscsi.firewall import PortalFilter
from applianced.iscsi.kernel import disk_devices
from applianced.replication import bitmap, throttle

log = logging.getLogger(__name__)

SECTOR = 512
# The metadata area at the front of each leg: md's superblock and a bitmap of up to
# 2**21 regions (256 KiB), with room to spare.
META_SECTORS = 2048
MAX_REGIONS = 2**21
DEFAULT_REGION = 64 * 1024
DEFAULT_PORT = 10809
LEG_PREFIX = "applianced-leg-"
EXPORT_PREFIX = "applianced-export-"
COPY_PREFIX = "applianced-copy-"
MIRROR_PREFIX = "applianced-mirror-"
# Each qemu-nbd serving a copy (``--aio=native``) holds Linux AIO contexts, and the kernel's
# ceiling for all of them together (fs.aio-max-nr, 65536 by default) left no room for a
# node's 65th copy ("failed to create linux AIO context", bench/replication.py --volumes 64).
AIO_MAX_NR = Path("/proc/sys/fs/aio-max-nr")
AIO_EVENTS = 1 << 20


def region_size(size: int, wanted: int = DEFAULT_REGION) -> int:
    """The region (bytes per bitmap bit): ``wanted``, doubled until 2**21 regions cover ``size``."""
    if wanted < 4096 or wanted & (wanted - 1):
        raise InvalidArgument(f"region size {wanted} is not a power of two of at least 4096 bytes")
    region = wanted
    while -(-size // region) > MAX_REGIONS:
        region *= 2
    return region


@dataclass(frozen=True)
class Volume:
    """A disk that is mirrored: its name, its file or block device on this node, its size."""

    name: str
    path: str
    is_file: bool
    size: int
    region: int = DEFAULT_REGION

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % 4096:
            raise InvalidArgument(f"a mirrored disk's size must be a multiple of 4 KiB, not {self.size} bytes")

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    def device(self) -> str:
        """The node of the disk's data now: the block device, or the file's loop device
        (the one the disk device shares, or a new one: a loop goes when its last user does)."""
        return disk_devices.local_device(self.path, self.is_file, self.size)

    def release(self) -> None:
        """Let go of the file's loop device (it goes once nothing else uses it)."""
        if self.is_file:
            for node in loop.backed_by(Path(self.path)):
                disk_devices.release_local_device(node)

    @property
    def regions(self) -> int:
        return -(-self.size // region_size(self.size, self.region))


@dataclass(frozen=True)
class PeerEndpoint:
    """Where the peer serves its copy (the export is named after the disk there), and how
    hard the NBD client tries."""

    address: str
    export: str
    port: int = DEFAULT_PORT
    connections: int = 1
    timeout: int = 5  # seconds before an unanswered request fails the peer's leg


def meta_path(state_dir: Path, name: str) -> Path:
    """The metadata of this node's own array of ``name``."""
    return state_dir / "replication" / f"{name}.meta"


def export_meta_path(state_dir: Path, name: str) -> Path:
    """The metadata in front of the copy that this node serves: the peer's array's member."""
    return state_dir / "replication" / f"{name}.export.meta"


def _meta_file(path: Path, fresh: bool) -> Path:
    """The metadata file ``path``: created zeroed if missing, or zeroed again if ``fresh``."""
    if fresh or not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_suffix(".meta.new")
        with open(partial, "wb") as f:
            f.truncate(META_SECTORS * SECTOR)
            os.fsync(f.fileno())
        os.replace(partial, path)
    return path


def _stack_leg(mapper: dm.DeviceMapper, name: str, meta: Path, volume: Volume) -> str:
    """The linear device [metadata][disk] called ``name``, made if missing; its node."""
    info = mapper.info(name)
    if info is None:
        mapper.create(name, _leg_segments(meta, volume), uuid=f"APPLIANCED-{name}")
    else:
        dm.make_node(name, info.dev)
    return str(dm.node_path(name))


def _leg_segments(meta: Path, volume: Volume) -> list[dm.Segment]:
    """A leg's table: [metadata][disk]."""
    return [dm.linear(META_SECTORS, _meta_loop(meta)), dm.linear(volume.sectors, volume.device(), 0, META_SECTORS)]


def _grow_leg(mapper: dm.DeviceMapper, name: str, meta: Path, grown: Volume) -> None:
    """Reload the leg ``name`` over ``grown``'s larger disk (its loop device grows first)."""
    mapper.reload(name, _leg_segments(meta, grown))


def _meta_loop(meta: Path) -> str:
    attached = loop.backed_by(meta)
    return attached[0] if attached else loop.attach(meta, META_SECTORS * SECTOR)


def _remove_leg(mapper: dm.DeviceMapper, name: str, meta: Path) -> None:
    mapper.remove(name)
    for node in loop.backed_by(meta):
        with contextlib.suppress(KernelError):
            loop.detach(node)


class Mirror:
    """The source side: the raid1 over the local disk and the peer's copy."""

    def __init__(self, volume: Volume, state_dir: Path, mapper: dm.DeviceMapper | None = None) -> None:
        self.volume = volume
        self.state_dir = state_dir
        self.dm = mapper or dm.DeviceMapper()

    @property
    def leg_name(self) -> str:
        return LEG_PREFIX + self.volume.name

    @property
    def node(self) -> str:
        """The array's node: what the disk device maps while the disk is mirrored."""
        return str(dm.node_path(MIRROR_PREFIX + self.volume.name))

    @property
    def meta(self) -> Path:
        return meta_path(self.state_dir, self.volume.name)

    def array(self) -> md.Array | None:
        """The running array over the local leg, if any."""
        if self.dm.info(self.leg_name) is None:
            return None
        return md.holder_array(str(dm.node_path(self.leg_name)))

    def status(self) -> md.ArrayStatus | None:
        array = self.array()
        return array.status() if array else None

    def has_metadata(self) -> bool:
        """Whether md ever wrote this mirror's superblock (the mirror exists on disk)."""
        return self.meta.exists() and bitmap.has_superblock(bitmap.read_metadata(self.meta))

    def assemble(self) -> md.Array:
        """Run the array from the local leg (the peer's is added by ``connect``); adopts a
        running one. KernelError if this node holds no metadata of the mirror."""
        return self._assemble(self.array())[0]

    def start(self, write_behind: int) -> md.ArrayStatus:
        """``assemble``, in the mode asked (``set_write_behind``); the array's status. md's
        state is read once: a starting daemon starts every array at once, on CPUs that
        udev's handling of each new array shares."""
        array, status = self._assemble(self.array())
        return self._set_write_behind(array, status, write_behind)

    @property
    def export_meta(self) -> Path:
        return export_meta_path(self.state_dir, self.volume.name)

    def prepare(self, fresh: bool = False) -> md.Array | None:
        """The copy's prepared array: its own array over its own leg, degraded and idle,
        adopted if it runs, assembled from this node's own metadata if it has one (whose
        bitmap marks what this node wrote that the source may lack), else forked from the
        export's metadata; with ``fresh``, forked anew (the copy caught up: nothing differs).
        None while the source's array has written no metadata to the export yet. Its node
        (``node``) is made: the target service makes the copy's LUNs over it in advance."""
        array = self.array()
        if array is not None and not fresh:
            return self._named(array)
        if fresh or not self.has_metadata():
            exported = bitmap.read_metadata(self.export_meta)
            if not bitmap.has_superblock(exported):
                return None
            self._fork(exported)
        leg = _stack_leg(self.dm, self.leg_name, self.meta, self.volume)
        array = md.holder_array(leg) or md.assemble([leg])
        # The leg was the source's write-mostly one: reads stay on it from now on, and md
        # writes that to the superblock here rather than in a takeover's stall.
        self._local_reads(array)
        return self._named(array)

    def adopt(self) -> md.Array | None:
        """The copy's prepared array if it runs (a daemon's start), with its node made."""
        array = self.array()
        return None if array is None else self._named(array)

    def _named(self, array: md.Array) -> md.Array:
        dm.make_node(MIRROR_PREFIX + self.volume.name, array.device_number)
        return array

    def take_over(self, write_behind: int, dirty: Sequence[tuple[int, int]] = ()) -> md.ArrayStatus:
        """The copy becomes the source: its prepared array (forked now if there is none)
        runs, in the mode asked, with the regions marked that the old source's bitmap marks
        in the export's metadata (writes it had begun) and ``dirty``; the array's status."""
        exported = bitmap.read_metadata(self.export_meta)
        running = self.array()
        if running is None and not self.has_metadata():
            self._fork(exported)
        array, status = self._assemble(running)
        array.mark_dirty([*bitmap.parse(exported).ranges(), *dirty])
        return self._set_write_behind(array, status, write_behind)

    def discard(self) -> None:
        """Stop this node's own array and forget its metadata: the copy's array is forked
        anew, from the export's (a grow changed the disk's size)."""
        self._take_down()
        self.meta.unlink(missing_ok=True)

    def _fork(self, exported: bytes) -> None:
        """This node's own metadata made a copy of ``exported``, the export's as read (an
        array running over it is stopped first, and its leg taken down, so that the file
        can be replaced)."""
        if not bitmap.has_superblock(exported):
            raise KernelError(f"the copy of {self.volume.name} holds no metadata of the source's array")
        # Its bits start clear: those the source has set (a resync just done leaves its
        # regions marked until md clears them lazily) are merged at a takeover, from the
        # export's metadata as it is then; kept here they would be copied at every resync.
        try:
            data = bitmap.cleared(exported)
        except InvalidArgument as exc:
            raise KernelError(f"the copy of {self.volume.name}: {exc}") from None
        self._take_down()
        partial = self.meta.with_suffix(".meta.new")
        with open(partial, "wb") as f:
            f.write(data)
            f.truncate(META_SECTORS * SECTOR)
            os.fsync(f.fileno())
        os.replace(partial, self.meta)

    def _assemble(self, running: md.Array | None) -> tuple[md.Array, md.ArrayStatus]:
        """The array ``running`` (prepared, or adopted after a restart: nothing read), or
        assembled from this node's metadata, made writable; its status."""
        array = running
        if array is None:
            if not self.has_metadata():
                raise KernelError(f"no mirror metadata for {self.volume.name} on this node")
            leg = _stack_leg(self.dm, self.leg_name, _meta_file(self.meta, False), self.volume)
            array = md.holder_array(leg) or md.assemble([leg])
        if array.read("array_state") in ("readonly", "read-auto"):
            # What ``mdadm --readwrite`` does, without its process start (most of a second
            # under emulation, in a takeover's stall).
            array.write("array_state", "active")
        self._named(array)
        return array, self._local_reads(array)

    def create(self, peer: PeerEndpoint) -> md.Array:
        """A new array over the local disk and the peer's copy, both declared in sync.

        The caller takes the peer's leg out (``detach``) before anything writes through
        the array when regions must be copied, and adds it back (``connect``) after
        marking them (``mark_dirty``).
        """
        meta = _meta_file(self.meta, fresh=True)
        leg = _stack_leg(self.dm, self.leg_name, meta, self.volume)
        device = md.free_array_name()
        peer_leg = nbd.connect(peer.address, peer.port, peer.export, peer.timeout, peer.connections)
        try:
            region = region_size(self.volume.size, self.volume.region)
            md.mdadm(
                "--create",
                device,
                "--run",
                "--level=1",
                "--raid-devices=2",
                "--metadata=1.2",
                "--data-offset=1M",
                f"--size={self.volume.size // 1024}",
                "--bitmap=internal",
                f"--bitmap-chunk={region // 1024}K",
                "--assume-clean",
                "--name=applianced",
                leg,
                "--write-mostly",
                peer_leg,
            )
            # Again without md's bad-block logs (mdadm makes them at --create).
            md.mdadm("--stop", device)
            md.mdadm("--assemble", device, "--run", "--update=no-bbl", leg, peer_leg)
        except BaseException:
            with contextlib.suppress(KernelError):
                md.mdadm("--stop", device)
            with contextlib.suppress(KernelError):
                nbd.disconnect(peer_leg)
            raise
        array = md.holder_array(leg)
        if array is None:
            raise KernelError(f"mdadm made no array over {leg}")
        dm.make_node(MIRROR_PREFIX + self.volume.name, array.device_number)
        return array

    def connect(self, peer: PeerEndpoint) -> str:
        """Add the peer's leg back: md copies the regions its bitmap marks; the NBD device."""
        array = self.assemble()
        live = [leg for leg in array.status().legs if leg.name.startswith("nbd") and not leg.faulty]
        if live:
            return f"/dev/{live[0].name}"
        self.detach()  # a failed leg still in the array
        peer_leg = nbd.connect(peer.address, peer.port, peer.export, peer.timeout, peer.connections)
        try:
            own = bitmap.read_metadata(self.meta)
            member = md.member_superblock(own[bitmap.SUPERBLOCK_OFFSET :], bitmap.parse(own).events_cleared)
            md.write_superblock(peer_leg, bitmap.SUPERBLOCK_OFFSET, member)
            md.mdadm("--manage", array.node, "--re-add", peer_leg)
        except KernelError:
            with contextlib.suppress(KernelError):
                nbd.disconnect(peer_leg)
            raise
        self._local_reads(array)
        return peer_leg

    def detach(self) -> None:
        """Take the peer's leg out (the bitmap records what it misses from now on) and
        disconnect it; nothing if it is out already."""
        array = self.array()
        if array is None:
            return
        for leg in array.status().legs:
            if not leg.name.startswith("nbd"):
                continue
            if not leg.faulty:
                array.write(f"dev-{leg.name}/state", "faulty")
            _remove_leg_from(array, leg.name)
            with contextlib.suppress(KernelError):
                nbd.disconnect(f"/dev/{leg.name}")

    def mark_dirty(self, ranges: list[tuple[int, int]]) -> None:
        """Mark regions to copy at the next ``connect`` (the peer's leg must be out)."""
        array = self.array()
        if array is None:
            raise KernelError(f"the mirror of {self.volume.name} is not assembled")
        array.mark_dirty(ranges)

    def set_write_behind(self, writes: int) -> None:
        """Async mode with up to ``writes`` behind on the peer's leg; 0 is sync mode.

        md takes it only while a write-mostly leg is in the array: while the peer's leg is
        out this does nothing, and ``connect`` sets it again."""
        array = self.array()
        if array is not None:
            self._set_write_behind(array, array.status(), writes)

    @staticmethod
    def _set_write_behind(array: md.Array, status: md.ArrayStatus, writes: int) -> md.ArrayStatus:
        """``set_write_behind`` on ``array`` as ``status`` shows it; its status after."""
        wanted = min(writes, md.MAX_WRITE_BEHIND)
        if status.write_behind == wanted or not any("write_mostly" in leg.states for leg in status.legs):
            return status
        array.write("bitmap/backlog", str(wanted))
        return dataclasses.replace(status, write_behind=wanted)

    def set_resync_limit(self, kib_per_second: int) -> None:
        """The fastest a resync may copy (0: md's own maximum)."""
        array = self.array()
        if array is not None:
            array.write("sync_speed_max", str(kib_per_second) if kib_per_second else "system")

    def intent_bitmap(self) -> bitmap.Bitmap:
        """The intent bitmap as this node's metadata holds it."""
        return bitmap.parse(bitmap.read_metadata(self.meta))

    def grow(self, size: int) -> None:
        """The disk's file grew to ``size``: the loop device, the leg and the array follow
        (the peer's leg is out; the new space is zeros on both nodes, like a sparse file)."""
        array = self.assemble()
        grown = dataclasses.replace(self.volume, size=size)
        _grow_leg(self.dm, self.leg_name, self.meta, grown)
        md.mdadm("--grow", array.node, f"--size={size // 1024}")

    def reset_queue_max(self) -> None:
        """Start counting the write-behind queue's maximum again (sampled by the monitor)."""
        array = self.array()
        if array is not None:
            array.reset_max_behind()

    def disassemble(self) -> None:
        """Take the peer's leg out, then stop: the local disk stays as it is, with all its
        data; the metadata file is kept (the bitmap of a later reassembly)."""
        self.detach()
        self.stop()

    def stop_array(self) -> None:
        """Stop the array with both legs as they are; the local leg stays, for an array
        assembled over it again."""
        array = self.array()
        if array is not None:
            peer_legs = [leg.name for leg in array.status().legs if leg.name.startswith("nbd")]
            array.stop()
            for leg in peer_legs:
                with contextlib.suppress(KernelError):
                    nbd.disconnect(f"/dev/{leg}")
        self.dm.remove(MIRROR_PREFIX + self.volume.name)

    def stop(self) -> None:
        """``stop_array``, and the local leg goes too."""
        self._take_down()
        self.volume.release()

    def _take_down(self) -> None:
        """``stop_array`` and the local leg's devices; the disk and the metadata file stay."""
        self.stop_array()
        _remove_leg(self.dm, self.leg_name, self.meta)

    def _local_reads(self, array: md.Array) -> md.ArrayStatus:
        """Reads from the local leg: only the peer's leg is write-mostly. After a role swap
        the legs' flags in their superblocks are the other way round. The array's status after."""
        status = array.status()
        flipped = False
        for leg in status.legs:
            peer_side = leg.name.startswith("nbd")
            if not leg.faulty and peer_side != ("write_mostly" in leg.states):
                array.write(f"dev-{leg.name}/state", "writemostly" if peer_side else "-writemostly")
                flipped = True
        return array.status() if flipped else status


def _remove_leg_from(array: md.Array, leg: str) -> None:
    # md refuses to remove a leg while I/O to it is still failing over; it takes a moment.
    for _ in range(50):
        try:
            array.write(f"dev-{leg}/state", "remove")
            return
        except KernelError:
            time.sleep(0.1)
    raise KernelError(f"{array.name}: the peer's leg {leg} could not be removed")


def allocated_ranges(path: Path, size: int, region: int) -> list[tuple[int, int]]:
    """The regions of a sparse disk file that hold data (SEEK_DATA/SEEK_HOLE): what an
    initial sync copies; a hole reads as zeros, as the peer's new copy does."""
    ranges: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break  # no data after offset (ENXIO)
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            start, end = data // region, -(-hole // region)
            if ranges and ranges[-1][1] >= start:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
            else:
                ranges.append((start, end))
            offset = hole
    finally:
        os.close(fd)
    return ranges


def server_command(name: str, device: str, address: str, port: int, pid_file: Path) -> list[str]:
    """qemu-nbd serving ``device`` as export ``name``; it forks once it listens.

    ``--cache=none`` opens the device with O_DIRECT, and qemu-nbd always advertises FLUSH
    and FUA, which it passes to the device: nothing is acknowledged from the page cache.
    ``--shared`` admits a few connections, for a reconnection that overlaps a dying one.
    """
    return [
        "qemu-nbd",
        "--fork",
        f"--pid-file={pid_file}",
        "--persistent",
        "--shared=8",
        "--cache=none",
        "--aio=native",
        "--discard=unmap",
        "--format=raw",
        f"--bind={address}",
        f"--port={port}",
        f"--export-name={name}",
        device,
    ]


def export_filter(address: str, port: int, peer: str) -> PortalFilter:
    """The firewall rule of an export: only the peer's address may connect; others get a reset."""
    return PortalFilter(address, port, (ipaddress.ip_network(peer),), (), what="replication export")


class Export:
    """The target side: the peer's copy of ``volume`` served to the source over NBD."""

    def __init__(self, volume: Volume, state_dir: Path, mapper: dm.DeviceMapper | None = None) -> None:
        self.volume = volume
        self.state_dir = state_dir
        self.dm = mapper or dm.DeviceMapper()

    @property
    def name(self) -> str:
        """The served leg's name: [the export's metadata][the copy]."""
        return EXPORT_PREFIX + self.volume.name

    @property
    def copy_name(self) -> str:
        return COPY_PREFIX + self.volume.name

    @property
    def meta(self) -> Path:
        return export_meta_path(self.state_dir, self.volume.name)

    def assemble(self, address: str, port: int, fresh: bool = False) -> None:
        """Serve the copy on ``address:port``; adopts a running server and existing devices.
        ``fresh`` zeroes the metadata first (a new mirror)."""
        if self.dm.info(self.copy_name) is not None:
            raise KernelError(f"the copy of {self.volume.name} is unlocked for reading; lock it first")
        if fresh and self.server_pid() is not None:
            self._stop_server()
        meta = _meta_file(self.meta, fresh)
        node = _stack_leg(self.dm, self.name, meta, self.volume)
        if self.fenced():
            # Served again after a takeover that fenced it was undone (or the node is the
            # copy again): the leg maps the copy again, under a new server.
            self._stop_server()
            self.dm.reload(self.name, _leg_segments(meta, self.volume))
        if self.server_pid() is None:
            tools.run(server_command(self.volume.name, node, address, port, self._pid_file()))

    def fence(self) -> None:
        """From now on nothing reaches the copy through the export: the served leg is
        suspended (once the I/O in flight is done), so that whatever the old source still
        sends waits there, and fails when the server stops (``_stop_server``). A takeover
        fences in its stall and stops the server (``stop_serving``) after its clients are
        served: a qemu-nbd's exit is slow under emulation, and 64 of them took 5.9 s of a
        takeover (bench/failover.py). A suspension, unlike a table reload, sends no uevent:
        udev's handling of 64 of them ran in the stall (bench/array_start.py)."""
        info = self.dm.info(self.name)
        if info is not None and not self._fenced(info):
            self.dm.suspend(self.name)

    def fenced(self) -> bool:
        info = self.dm.info(self.name)
        return info is not None and self._fenced(info)

    def _fenced(self, info: dm.Info) -> bool:
        """Suspended (a fence), or failing every I/O (a fence's end, its server stopped)."""
        return info.suspended or [segment.kind for segment in self.dm.table(self.name) or []] == ["error"]

    def _fail_held(self) -> None:
        """A suspended (fenced) leg fails every I/O from now on, those it held too."""
        info = self.dm.info(self.name)
        if info is not None and info.suspended:
            self.dm.reload(self.name, [dm.error(META_SECTORS + self.volume.sectors)])

    def _pid_file(self) -> Path:
        return self.state_dir / "replication" / f"{self.volume.name}.nbd-server.pid"

    def server_pid(self) -> int | None:
        """The pid of the qemu-nbd serving this copy, if it runs."""
        try:
            pid = int(self._pid_file().read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return (
            pid
            if cmdline[0].endswith(b"qemu-nbd") and f"--export-name={self.volume.name}".encode() in cmdline
            else None
        )

    def unlock_read_only(self) -> str:
        """Stop serving and show the copy read-only (for a backup); the node of that device."""
        self._stop_server()
        if self.dm.info(self.copy_name) is None:
            self.dm.create(self.copy_name, [dm.linear(self.volume.sectors, self.volume.device())], read_only=True)
        return str(dm.node_path(self.copy_name))

    def lock(self) -> None:
        """Take the read-only view away again (Busy while something has it open)."""
        info = self.dm.info(self.copy_name)
        if info is not None and info.open_count:
            raise KernelError(f"the read-only copy of {self.volume.name} is in use (unmount it first)")
        self.dm.remove(self.copy_name)

    def intent_bitmap(self) -> bitmap.Bitmap:
        """What this node may have written that the source lacks: its own array's bitmap
        (which starts as the source's at each fork), or the export's if it never had one."""
        own_path = meta_path(self.state_dir, self.volume.name)
        own = bitmap.read_metadata(own_path) if own_path.exists() else b""
        return bitmap.parse(own if bitmap.has_superblock(own) else bitmap.read_metadata(self.meta))

    def grow(self, size: int) -> None:
        """The copy's file grew to ``size``: the leg follows. qemu-nbd sizes its export when
        it starts, so it stops here; ``assemble`` starts it again."""
        self._stop_server()
        _grow_leg(self.dm, self.name, self.meta, dataclasses.replace(self.volume, size=size))
        # The source's array grew while this leg was out: without the new size in its
        # superblock, md would refuse to re-add it (and copy everything on a plain add).
        if bitmap.has_superblock(bitmap.read_metadata(self.meta)):
            md.set_member_size(self.meta, bitmap.SUPERBLOCK_OFFSET, size // SECTOR)

    def stop_serving(self) -> None:
        """Stop serving: from now on the source's writes do not reach the copy (a takeover)."""
        self._stop_server()
        self.lock()

    def disassemble(self) -> None:
        """Stop serving; the disk is left as it is, the metadata file is kept."""
        self.stop_serving()
        _remove_leg(self.dm, self.name, self.meta)
        self.volume.release()

    def _stop_server(self) -> None:
        # Not left suspended either way: a server waits for its requests before it exits,
        # and a suspended device hangs whoever reads it (blkid, LVM's scans).
        self._fail_held()
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise KernelError(f"qemu-nbd (pid {pid}) did not stop")
        time.sleep(0.05)


def make_room_for_aio() -> None:
    """Raise fs.aio-max-nr to ``AIO_EVENTS`` (a higher value, an administrator's, stays). A
    node that may not leaves it and says so: copies beyond the limit fail to be served,
    with qemu-nbd's error."""
    try:
        if int(AIO_MAX_NR.read_text()) < AIO_EVENTS:
            AIO_MAX_NR.write_text(str(AIO_EVENTS))
    except (OSError, ValueError) as exc:
        log.warning("fs.aio-max-nr stays as it is (%s): a node serving many copies may run out of AIO contexts", exc)


class DataPath:
    """The data path of every mirror on this node, as the replication service drives it.

    One object for both roles, so that a stand-in (tests/support) can replace the kernel
    for the service's logic; each method is a blocking call, made off the event loop.
    """

    def __init__(self, state_dir: Path, mapper: dm.DeviceMapper | None = None) -> None:
        self.state_dir = state_dir
        self.dm = mapper or dm.DeviceMapper()

    def mirror(self, volume: Volume) -> Mirror:
        return Mirror(volume, self.state_dir, self.dm)

    def export(self, volume: Volume) -> Export:
        return Export(volume, self.state_dir, self.dm)

    def prepare(self) -> None:
        """What the data path needs: md's raid1 and the NBD client loaded, and room for
        every copy's AIO contexts."""
        tools.run(["modprobe", "-a", "md_mod", "raid1", "dm_mod", "loop"])
        nbd.load_module()
        make_room_for_aio()

    def peer_answers(self, endpoint: PeerEndpoint, timeout: float = 2.0) -> bool:
        return nbd.answers(endpoint.address, endpoint.port, timeout)

    def allocated(self, volume: Volume) -> list[tuple[int, int]]:
        """The regions to copy at an initial sync: a file's data, a block device's all."""
        if volume.is_file:
            return allocated_ranges(Path(volume.path), volume.size, region_size(volume.size, volume.region))
        return [(0, volume.regions)]

    def throttle(self, limits: list[throttle.Limit]) -> None:
        """Limit each source mirror's traffic to its copy (``throttle``)."""
        throttle.apply(limits)

    def release(self, volume: Volume) -> None:
        """Forget this node's half of a mirror: metadata included."""
        meta_path(self.state_dir, volume.name).unlink(missing_ok=True)
        export_meta_path(self.state_dir, volume.name).unlink(missing_ok=True)
