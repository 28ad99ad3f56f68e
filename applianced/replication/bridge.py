"""The replication data path on one node: device-mapper raid1 over the kernel's NBD client.

On the **source** node (the one initiators write to)::

    applianced-repl-<name>         raid raid1: leg 0 = local meta + local disk,
                                               leg 1 = peer meta + peer data (write-mostly)
    applianced-repl-<name>-pmeta   linear: the first META_SECTORS of /dev/nbdN
    applianced-repl-<name>-pdata   linear: the rest of /dev/nbdN

On the **target** node (the peer's copy)::

    applianced-repl-<name>-export  linear: local meta, then the local disk; served by qemu-nbd

Why this shape:

- dm-raid keeps its superblock and bitmap on separate metadata devices, so the disk itself
  is mirrored from sector 0 as it is: a disk that initiators already use keeps its content,
  and taking the mirror away leaves a plain disk. md's own formats would put a superblock
  on the disk (1.0 at its end, where our trailer is; 1.2 at its start).
- The bitmap (one bit per region, 64 KiB by default) is the persistent intent log: after a
  dead link, a dead peer or a reboot, recovery copies only dirty regions.
- The peer's leg needs its metadata on the peer too, or a revived leg would be copied in
  full; one export carries both, split again on the source by two linear devices.
- Those linear devices are also where a reconnection happens: a dead NBD device cannot be
  revived (its sockets are gone), so a new one is connected, the linear tables are swapped
  to it under suspend, and a reload of the raid table revives the leg from its bitmap.
- The peer's leg is write-mostly: reads are served by the local disk.
- qemu-nbd serves with ``--cache=none`` (O_DIRECT) and advertises FLUSH and FUA, so no write
  is acknowledged from the peer's page cache; it runs detached, so the data path keeps going
  while applianced restarts, and an assemble adopts it.
- nbd-client configures the kernel over netlink with an I/O timeout: a dead peer fails the
  leg after about ``connections * timeout`` seconds instead of hanging I/O, and md carries
  on with the local leg, so initiators see no error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from applianced.errors import InvalidArgument, KernelError
from applianced.iscsi.firewall import PortalFilter
from applianced.replication import bitmap
from applianced.replication.states import RaidStatus

SECTOR = 512
# Room for dm-raid's superblock (4 KiB) and a bitmap of up to 2**21 regions (256 KiB).
META_SECTORS = 2048
MAX_REGIONS = 2**21
DEFAULT_REGION = 64 * 1024
DEFAULT_PORT = 10809
PREFIX = "applianced-repl-"

Runner = Callable[[Sequence[str]], str]


def run(argv: Sequence[str]) -> str:
    """Run a tool; its stdout, or KernelError with what it printed."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise KernelError(f"{' '.join(argv[:3])}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


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
    """A disk that is mirrored: its name, its block device on this node and its size."""

    name: str
    device: str
    size: int
    region: int = DEFAULT_REGION

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % SECTOR:
            raise InvalidArgument(f"mirror size {self.size} is not a positive multiple of {SECTOR}")

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    @property
    def mirror(self) -> str:
        return PREFIX + self.name

    @property
    def export(self) -> str:
        return f"{PREFIX}{self.name}-export"

    @property
    def peer_meta(self) -> str:
        return f"{PREFIX}{self.name}-pmeta"

    @property
    def peer_data(self) -> str:
        return f"{PREFIX}{self.name}-pdata"


class DeviceMapper:
    """dmsetup, loop and NBD devices through their tools, as a runner executes them."""

    def __init__(self, runner: Runner = run) -> None:
        self.run = runner

    def table(self, name: str) -> str | None:
        return self._query("table", name)

    def status(self, name: str) -> str | None:
        return self._query("status", name)

    def _query(self, verb: str, name: str) -> str | None:
        """What ``dmsetup VERB NAME`` prints, or None if no such device is mapped."""
        try:
            return self.run(["dmsetup", verb, name]).strip()
        except KernelError:
            return None

    def create(self, name: str, table: str) -> None:
        self.run(["dmsetup", "create", name, "--table", table])

    def reload(self, name: str, table: str) -> None:
        self.run(["dmsetup", "suspend", name])
        try:
            self.run(["dmsetup", "load", name, "--table", table])
        finally:
            self.run(["dmsetup", "resume", name])

    def remove(self, name: str) -> None:
        if self.table(name) is not None:
            self.run(["dmsetup", "remove", name])

    def node(self, name: str) -> str:
        """``/dev/dm-N`` of a mapped device (no udev needed)."""
        major_minor = self.run(["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name]).strip()
        return _node_of(major_minor)

    def loop(self, path: Path) -> str:
        """The loop device of ``path``: the one attached already, or a new one."""
        attached = self._loops_of(path)
        if attached:
            return attached[0]
        try:
            return self.run(["losetup", "-f", "--show", "--direct-io=on", str(path)]).strip()
        except KernelError:
            # Some file systems (tmpfs) have no direct I/O; md's flushes still reach the
            # file through the loop driver's fsync.
            return self.run(["losetup", "-f", "--show", str(path)]).strip()

    def detach_loop(self, path: Path) -> None:
        for device in self._loops_of(path):
            self.run(["losetup", "-d", device])

    def _loops_of(self, path: Path) -> list[str]:
        return self.run(["losetup", "-j", str(path), "-O", "NAME", "-n"]).split()


def _node_of(major_minor: str) -> str:
    """``/dev/<name>`` of a block device given as ``major:minor``."""
    link = Path("/sys/dev/block") / major_minor
    try:
        return "/dev/" + os.path.basename(os.readlink(link))
    except OSError:
        raise KernelError(f"no block device {major_minor}") from None


def _linear_source(table: str | None) -> str | None:
    """The device (``major:minor``) under a one-segment linear table."""
    match = re.fullmatch(r"\d+ \d+ linear (\d+:\d+) \d+", table or "")
    return match.group(1) if match else None


# dm-raid's superblock starts with this magic (little endian), in the first sector.
RAID_MAGIC = (0x64526D44).to_bytes(4, "little")


def state_file(state_dir: Path, volume: Volume, suffix: str) -> Path:
    """A file of ``volume``'s mirror in the state directory (``.meta``, ``.nbd-server.pid``)."""
    return state_dir / "replication" / f"{volume.name}{suffix}"


def meta_path(state_dir: Path, volume: Volume) -> Path:
    return state_file(state_dir, volume, ".meta")


def _meta_file(state_dir: Path, volume: Volume) -> tuple[Path, bool]:
    """The metadata file of ``volume`` (created zeroed if missing), and whether md has
    written a superblock to it: without one the mirror is new, whatever a crashed earlier
    run left behind."""
    path = meta_path(state_dir, volume)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        partial = path.with_suffix(".meta.new")
        with open(partial, "wb") as f:
            f.truncate(META_SECTORS * SECTOR)
            os.fsync(f.fileno())
        os.replace(partial, path)
    return path, not bitmap.read_metadata(path).startswith(RAID_MAGIC)


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

    def __init__(self, volume: Volume, state_dir: Path, dm: DeviceMapper) -> None:
        self.volume = volume
        self.state_dir = state_dir
        self.dm = dm

    def assemble(self, address: str, port: int = DEFAULT_PORT) -> None:
        """Serve the copy on ``address:port``; adopts a running server and existing devices."""
        meta, _ = _meta_file(self.state_dir, self.volume)
        loop = self.dm.loop(meta)
        table = f"0 {META_SECTORS} linear {loop} 0\n{META_SECTORS} {self.volume.sectors} linear {self.volume.device} 0"
        if self.dm.table(self.volume.export) is None:
            self.dm.create(self.volume.export, table)
        if self.server_pid() is None:
            self.dm.run(
                server_command(self.volume.name, self.dm.node(self.volume.export), address, port, self._pid_file())
            )

    def _pid_file(self) -> Path:
        return state_file(self.state_dir, self.volume, ".nbd-server.pid")

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

    def disassemble(self) -> None:
        """Stop serving; the disk is left as it is, the metadata file is kept."""
        pid = self.server_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)
        self.dm.remove(self.volume.export)
        self.dm.detach_loop(meta_path(self.state_dir, self.volume))


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise KernelError(f"qemu-nbd (pid {pid}) did not stop")
        time.sleep(0.05)


@dataclass(frozen=True)
class PeerEndpoint:
    """Where the peer serves its copy, and how hard the NBD client tries."""

    address: str
    port: int = DEFAULT_PORT
    connections: int = 1
    timeout: int = 5  # seconds before an unanswered request fails the peer's leg


class Mirror:
    """The source side: the raid1 over the local disk and the peer's copy."""

    def __init__(self, volume: Volume, state_dir: Path, dm: DeviceMapper) -> None:
        self.volume = volume
        self.state_dir = state_dir
        self.dm = dm

    @property
    def device(self) -> str:
        """What the LIO backstore uses."""
        return f"/dev/mapper/{self.volume.mirror}"

    def status(self) -> RaidStatus | None:
        line = self.dm.status(self.volume.mirror)
        return RaidStatus.parse(line) if line else None

    def assemble(self, peer: PeerEndpoint, *, copy_all: bool = True) -> None:
        """Build, adopt or repair the mirror; safe to repeat after a crash at any step.

        A mirror met for the first time (no metadata yet) copies the local disk to the
        peer: all of it with ``copy_all``, or nothing (a blank pair of volumes). Afterwards
        a dead peer leg is reconnected and revived from the bitmap: a partial copy.
        """
        meta, new = _meta_file(self.state_dir, self.volume)
        loop = self.dm.loop(meta)
        status = self.status()
        peer_live = status is not None and not status.peer_dead and self._nbd_of_peer_leg() is not None
        if not peer_live:
            self._connect_peer_leg(peer)
        if status is None:
            self.dm.create(self.volume.mirror, self._table(loop, rebuild=new and copy_all, nosync=new and not copy_all))
        elif not peer_live:
            # The reload revives the leg: md finds its superblock and recovers dirty regions.
            self.dm.reload(self.volume.mirror, self._table(loop, rebuild=False, nosync=False))

    def intent_bitmap(self) -> bitmap.Bitmap:
        """The intent bitmap as this node's metadata holds it."""
        return bitmap.parse(bitmap.read_metadata(meta_path(self.state_dir, self.volume)))

    def resume(self, peer: PeerEndpoint, probe_timeout: float = 2.0) -> bool:
        """Revive a dead peer leg once the peer's server answers; whether it did.

        What the daemon calls every few seconds while a failure keeps a mirror paused. A
        TCP probe comes first: the NBD client connecting to an address that does not
        answer would wait for the kernel's SYN retries, about two minutes.
        """
        status = self.status()
        if status is None or not status.peer_dead:
            return False
        try:
            socket.create_connection((peer.address, peer.port), timeout=probe_timeout).close()
        except OSError:
            return False
        self.assemble(peer)
        return True

    def _table(self, local_meta: str, *, rebuild: bool, nosync: bool) -> str:
        region = region_size(self.volume.size, self.volume.region) // SECTOR
        params = ["0", "region_size", str(region), "write_mostly", "1"]
        if rebuild:
            # "rebuild" (not a plain resync): md copies leg 0 over leg 1. A resync of a new
            # array may read either leg, and the peer's blank copy would overwrite data.
            params += ["rebuild", "1"]
        elif nosync:
            params.append("nosync")
        legs = [
            local_meta,
            self.volume.device,
            self._mapper(self.volume.peer_meta),
            self._mapper(self.volume.peer_data),
        ]
        return f"0 {self.volume.sectors} raid raid1 {len(params)} {' '.join(params)} 2 {' '.join(legs)}"

    @staticmethod
    def _mapper(name: str) -> str:
        return f"/dev/mapper/{name}"

    def _nbd_of_peer_leg(self) -> str | None:
        """The NBD device (``/dev/nbdN``) the peer's leg is mapped on, if any."""
        source = _linear_source(self.dm.table(self.volume.peer_data))
        return _node_of(source) if source else None

    def _connect_peer_leg(self, peer: PeerEndpoint) -> None:
        old = self._nbd_of_peer_leg()
        nbd = self._free_nbd()
        self.dm.run(
            [
                "nbd-client",
                peer.address,
                str(peer.port),
                nbd,
                "-N",
                self.volume.name,
                "-b",
                "4096",
                "-t",
                str(peer.timeout),
                "-C",
                str(peer.connections),
            ]
        )
        tables = {
            self.volume.peer_meta: f"0 {META_SECTORS} linear {nbd} 0",
            self.volume.peer_data: f"0 {self.volume.sectors} linear {nbd} {META_SECTORS}",
        }
        for name, table in tables.items():
            if self.dm.table(name) is None:
                self.dm.create(name, table)
            else:
                self.dm.reload(name, table)
        if old is not None and old != nbd:
            self.dm.run(["nbd-client", "-d", old])

    @staticmethod
    def _free_nbd() -> str:
        """An NBD device with nothing connected (size 0)."""
        for block in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
            if (block / "size").read_text().strip() == "0" and not (block / "pid").exists():
                return f"/dev/{block.name}"
        raise KernelError("no free NBD device (load nbd with a larger nbds_max)")

    def disassemble(self) -> None:
        """Take the mirror apart: the local disk stays as it is, with all its data."""
        nbd = self._nbd_of_peer_leg()
        self.dm.remove(self.volume.mirror)
        self.dm.remove(self.volume.peer_meta)
        self.dm.remove(self.volume.peer_data)
        if nbd is not None:
            with contextlib.suppress(KernelError):
                self.dm.run(["nbd-client", "-d", nbd])
        self.dm.detach_loop(meta_path(self.state_dir, self.volume))
