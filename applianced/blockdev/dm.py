"""device-mapper through its ioctls on /dev/mapper/control: create, load, suspend, resume,
remove, and read tables and status.

The target service makes one device per disk at every restore, and replication reads the
status of every mirror each second: ``dmsetup`` would cost a process start for each (tens
of milliseconds, far more under emulation), an ioctl costs a system call. The layouts are
those of ``linux/dm-ioctl.h`` (interface version 4), on little-endian 64-bit machines.

Devices are named, and found by name; each also gets a block-device node of its own in
``NODE_DIR``, so that nothing depends on udev having made ``/dev/mapper/<name>`` yet.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from applianced.errors import KernelError

CONTROL = "/dev/mapper/control"
# Nodes of the devices applianced makes: /run is a tmpfs, made anew at every boot, as the
# devices themselves are.
NODE_DIR = Path("/run/applianced/block")

_HEADER = struct.Struct("<3IIIIiIIIQ128s129s7s")
_SPEC = struct.Struct("<QQiI16s")
_NAME_LIST = struct.Struct("<QI")
_DEPS = struct.Struct("<II")
VERSION = (4, 0, 0)
NAME_MAX = 127

# ioctl numbers: _IOWR(0xfd, nr, struct dm_ioctl)
_IOCTL_BASE = (3 << 30) | (_HEADER.size << 16) | (0xFD << 8)
LIST_DEVICES, DEV_CREATE, DEV_REMOVE, DEV_SUSPEND, DEV_STATUS, TABLE_LOAD, TABLE_CLEAR = 2, 3, 4, 6, 7, 9, 10
TABLE_DEPS, TABLE_STATUS, TARGET_MSG = 11, 12, 14

READONLY_FLAG = 1 << 0
SUSPEND_FLAG = 1 << 1
STATUS_TABLE_FLAG = 1 << 4
ACTIVE_PRESENT_FLAG = 1 << 5
BUFFER_FULL_FLAG = 1 << 8
NOFLUSH_FLAG = 1 << 11

_BUFFER = 16 * 1024


@dataclass(frozen=True)
class Segment:
    """One line of a table: ``length`` sectors from ``start``, mapped by target ``kind``."""

    start: int
    length: int
    kind: str
    params: str

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.kind} {self.params}"


def linear(length: int, device: str, offset: int = 0, start: int = 0) -> Segment:
    """A linear segment onto ``device`` (a node or ``major:minor``) from sector ``offset``."""
    return Segment(start, length, "linear", f"{device} {offset}")


def error(length: int) -> Segment:
    """A segment that fails every I/O (a fence: nothing written reaches a device any more)."""
    return Segment(0, length, "error", "")


@dataclass(frozen=True)
class Info:
    """What the kernel says of a mapped device."""

    name: str
    dev: int
    open_count: int
    suspended: bool
    read_only: bool
    live_table: bool
    uuid: str

    @property
    def major_minor(self) -> str:
        return f"{os.major(self.dev)}:{os.minor(self.dev)}"


class DeviceMapper:
    """device-mapper's control interface. Each call opens the control device for itself, so
    threads call side by side: a suspend waits for the device's I/O in flight, and a
    takeover suspends the exports of all its copies at once."""

    def _call(
        self,
        command: int,
        name: str = "",
        flags: int = 0,
        data: bytes = b"",
        uuid: str = "",
        targets: int = 0,
        size: int = _BUFFER,
    ) -> tuple[tuple, bytes]:
        if len(name.encode()) > NAME_MAX:
            raise KernelError(f"device-mapper name {name!r} is longer than {NAME_MAX} bytes")
        while True:
            header = _HEADER.pack(
                *VERSION,
                max(size, _HEADER.size + len(data)),
                _HEADER.size,
                targets,
                0,
                flags,
                0,
                0,
                0,
                name.encode(),
                uuid.encode(),
                b"",
            )
            buffer = bytearray(header + data)
            buffer.extend(bytes(max(0, size - len(buffer))))
            try:
                fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise KernelError(f"device-mapper is not available: {exc.strerror}") from None
            try:
                fcntl.ioctl(fd, _IOCTL_BASE | command, buffer, True)
            except OSError as exc:
                raise _error(command, name, exc) from None
            finally:
                os.close(fd)
            fields = _HEADER.unpack_from(buffer)
            if fields[7] & BUFFER_FULL_FLAG:
                size *= 4
                continue
            data_start, data_size = fields[4], fields[3]
            return fields, bytes(buffer[data_start:data_size])

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> dict[str, int]:
        """Every mapped device: name -> device number."""
        _, data = self._call(LIST_DEVICES)
        found: dict[str, int] = {}
        offset = 0
        while len(data) - offset >= _NAME_LIST.size:
            dev, step = _NAME_LIST.unpack_from(data, offset)
            if dev == 0 and step == 0 and offset == 0:
                break  # no devices at all
            name = data[offset + _NAME_LIST.size :].split(b"\0", 1)[0].decode()
            found[name] = dev
            if step == 0:
                break
            offset += step
        return found

    def info(self, name: str) -> Info | None:
        """The device called ``name``, None if there is none."""
        try:
            fields, _ = self._call(DEV_STATUS, name)
        except DmError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        flags = fields[7]
        return Info(
            name=name,
            dev=fields[10],
            open_count=fields[6],
            suspended=bool(flags & SUSPEND_FLAG),
            read_only=bool(flags & READONLY_FLAG),
            live_table=bool(flags & ACTIVE_PRESENT_FLAG),
            uuid=fields[12].split(b"\0", 1)[0].decode(),
        )

    def table(self, name: str) -> list[Segment] | None:
        """The live table of ``name`` (devices as ``major:minor``); None without a device."""
        return self._segments(name, STATUS_TABLE_FLAG)

    def status(self, name: str) -> list[Segment] | None:
        """What the targets of ``name`` report (``dmsetup status``); None without a device."""
        return self._segments(name, 0)

    def _segments(self, name: str, flags: int) -> list[Segment] | None:
        try:
            fields, data = self._call(TABLE_STATUS, name, flags)
        except DmError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        return _unpack_segments(data, fields[5])

    def dependencies(self, name: str) -> list[int]:
        """The device numbers that ``name``'s live table uses."""
        _, data = self._call(TABLE_DEPS, name)
        count, _ = _DEPS.unpack_from(data)
        return list(struct.unpack_from(f"<{count}Q", data, _DEPS.size))

    # -- changing --------------------------------------------------------------------------

    def create(self, name: str, segments: list[Segment], uuid: str = "", read_only: bool = False) -> Info:
        """A new device with ``segments`` live; nothing is left behind if a step fails."""
        self._call(DEV_CREATE, name, READONLY_FLAG if read_only else 0, uuid=uuid)
        try:
            return self.activate(name, segments)
        except BaseException:
            self._remove_quietly(name)
            raise

    def activate(self, name: str, segments: list[Segment]) -> Info:
        """Give a device that has no live table its first one (a crash may leave one so)."""
        info = self.info(name)
        flags = READONLY_FLAG if info and info.read_only else 0
        self._call(TABLE_LOAD, name, flags, _pack_segments(segments), targets=len(segments))
        self._call(DEV_SUSPEND, name)  # without SUSPEND_FLAG: resume, the new table goes live
        info = self.info(name)
        assert info is not None
        make_node(name, info.dev)
        return info

    def reload(self, name: str, segments: list[Segment], flush: bool = True) -> None:
        """Replace the live table: I/O pauses while the device is suspended, none fails.

        Suspending waits for the I/O in flight (``flush``), so that nothing written through
        the old table is still on its way when the new one takes over.
        """
        info = self.info(name)
        flags = READONLY_FLAG if info and info.read_only else 0
        self._call(TABLE_LOAD, name, flags, _pack_segments(segments), targets=len(segments))
        try:
            self.suspend(name, flush)
        except BaseException:
            self._call(TABLE_CLEAR, name)
            raise
        self.resume(name)

    def suspend(self, name: str, flush: bool = True) -> None:
        self._call(DEV_SUSPEND, name, SUSPEND_FLAG | (0 if flush else NOFLUSH_FLAG))

    def resume(self, name: str) -> None:
        self._call(DEV_SUSPEND, name)

    def remove(self, name: str) -> None:
        """Remove ``name`` if it exists; KernelError (Busy) while it is open."""
        try:
            self._call(DEV_REMOVE, name)
        except DmError as exc:
            if exc.errno != errno.ENXIO:
                raise
        node_path(name).unlink(missing_ok=True)

    def message(self, name: str, text: str) -> None:
        """Send a target message (``dmsetup message NAME 0 TEXT``)."""
        self._call(TARGET_MSG, name, data=struct.pack("<Q", 0) + text.encode() + b"\0")

    def _remove_quietly(self, name: str) -> None:
        with contextlib.suppress(KernelError):
            self._call(DEV_REMOVE, name)


# Every device-mapper device applianced makes is named with this prefix.
PREFIX = "applianced-"


def applianced_holders(block: str) -> tuple[list[str], list[str]]:
    """Who holds the block device ``block`` (its sysfs name, ``loop3``): applianced's own
    device-mapper devices, and everything else."""
    ours, others = [], []
    holders = Path("/sys/class/block") / block / "holders"
    for holder in sorted(holders.iterdir()) if holders.is_dir() else ():
        try:
            name = (holder / "dm" / "name").read_text().strip()
        except OSError:
            name = ""
        (ours if name.startswith(PREFIX) else others).append(name or holder.name)
    return ours, others


def node_path(name: str) -> Path:
    """The block-device node applianced keeps for device ``name``."""
    return NODE_DIR / name


def make_node(name: str, dev: int) -> str:
    """Make (or correct) ``name``'s node for device number ``dev``; its path."""
    path = node_path(name)
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == dev:
            return str(path)
        path.unlink()
    except FileNotFoundError:
        pass
    NODE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.mknod(path, 0o600 | stat.S_IFBLK, dev)
    return str(path)


class DmError(KernelError):
    """A device-mapper ioctl failed; ``errno`` says how."""

    def __init__(self, message: str, error: int) -> None:
        super().__init__(message)
        self.errno = error


_COMMANDS = {
    LIST_DEVICES: "list",
    DEV_CREATE: "create",
    DEV_REMOVE: "remove",
    DEV_SUSPEND: "suspend/resume",
    DEV_STATUS: "info",
    TABLE_LOAD: "load",
    TABLE_CLEAR: "clear",
    TABLE_DEPS: "deps",
    TABLE_STATUS: "table/status",
    TARGET_MSG: "message",
}


def _error(command: int, name: str, exc: OSError) -> DmError:
    what = f"device-mapper {_COMMANDS.get(command, command)}{f' of {name}' if name else ''}"
    reason = "it is in use" if exc.errno == errno.EBUSY else exc.strerror or str(exc)
    return DmError(f"{what} failed: {reason}", exc.errno or 0)


def _pack_segments(segments: list[Segment]) -> bytes:
    out = bytearray()
    for segment in segments:
        params = segment.params.encode() + b"\0"
        # Each spec starts 8-byte aligned; ``next`` is relative to this spec's start.
        length = _SPEC.size + len(params)
        length += -length % 8
        out += _SPEC.pack(segment.start, segment.length, 0, length, segment.kind.encode())
        out += params + bytes(length - _SPEC.size - len(params))
    return bytes(out)


def _unpack_segments(data: bytes, count: int) -> list[Segment]:
    segments = []
    offset = 0
    for _ in range(count):
        start, length, _, following, kind = _SPEC.unpack_from(data, offset)
        params = data[offset + _SPEC.size :].split(b"\0", 1)[0].decode()
        segments.append(Segment(start, length, kind.split(b"\0", 1)[0].decode(), params))
        # In answers ``next`` counts from the start of the data, not of this spec.
        offset = following
    return segments
