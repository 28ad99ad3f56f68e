"""The device-mapper devices under "dm" disks, read and changed through ``applianced.blockdev``.

Each such disk has one linear device, ``applianced-disk-<name>``, whose node LIO's block
backstore opens. It maps the disk's file through a loop device of the disk's size (the
trailer after the data is never part of it), or the disk's block device, or a mirror of
the disk that replication assembled. Re-pointing it is a table reload: I/O pauses while
the device is suspended and none fails, so a LUN stays where it is while the layers
under it change.

Each action is idempotent, like the LIO ones: a device already there with the wanted
table is left alone, a half-made one (a crash between its creation and its table) gets
its table, and a removal of what is gone does nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from applianced.blockdev import dm, loop
from applianced.errors import KernelError
from applianced.iscsi.kernel import plan
from applianced.iscsi.kernel.model import DiskDevice, disk_device_name

SECTOR = 512
SYS_DEV_BLOCK = Path("/sys/dev/block")


class DiskDevices:
    def __init__(self, mapper: dm.DeviceMapper | None = None) -> None:
        self.dm = mapper or dm.DeviceMapper()

    def observe(self, disks: Iterable[str], wanted: Mapping[str, DiskDevice]) -> dict[str, DiskDevice]:
        """The devices of ``disks`` that exist, as ``DiskDevice`` values (by disk name).

        A device's lower is named the way ``wanted`` names it when it is the same device,
        so that an unchanged device compares equal; a table of another shape reads as a
        device with another lower, which the plan reloads.
        """
        found = {}
        names = self.dm.names()
        for disk in disks:
            name = disk_device_name(disk)
            if name not in names:
                continue
            dm.make_node(name, names[name])
            found[disk] = self._read(name, wanted.get(disk))
        return found

    def _read(self, name: str, wanted: DiskDevice | None) -> DiskDevice:
        segments = self.dm.table(name) or []
        if len(segments) != 1 or segments[0].kind != "linear" or not segments[0].params.endswith(" 0"):
            return DiskDevice(name, "(another table)", False, 0)
        major_minor = segments[0].params.split()[0]
        size = segments[0].length * SECTOR
        backing = _loop_backing_file(major_minor)
        if backing is not None:
            return DiskDevice(name, backing, True, size)
        if wanted is not None and not wanted.lower_is_file and _device_number(wanted.lower) == major_minor:
            follows = wanted.size == 0 and size == _size(major_minor)
            return DiskDevice(name, wanted.lower, False, 0 if follows else size)
        return DiskDevice(name, f"/dev/block/{major_minor}", False, size)

    def apply(self, action: plan.Action) -> None:
        if isinstance(action, plan.RemoveDiskDevice):
            self._remove(action.name)
        elif isinstance(action, (plan.CreateDiskDevice, plan.ReloadDiskDevice)):
            self._map(action.device)
        else:
            raise TypeError(f"not a disk device action: {action!r}")

    def _map(self, device: DiskDevice) -> None:
        info = self.dm.info(device.name)
        old = self._lower_of(device.name) if info is not None and info.live_table else None
        lower = local_device(device.lower, device.lower_is_file, device.size, device.direct_io)
        sectors = (device.size or _size(_device_number(lower))) // SECTOR
        segments = [dm.linear(sectors, lower)]
        if info is None:
            self.dm.create(device.name, segments, uuid=f"APPLIANCED-{device.name}")
        elif not info.live_table:
            self.dm.activate(device.name, segments)  # made, but a crash came before its table
        elif self.dm.table(device.name) != [dm.Segment(0, sectors, "linear", f"{_device_number(lower)} 0")]:
            self.dm.reload(device.name, segments)
        else:
            dm.make_node(device.name, info.dev)
        if old is not None and old != _device_number(lower):
            _release_loop(old)

    def _lower_of(self, name: str) -> str | None:
        segments = self.dm.table(name) or []
        return segments[0].params.split()[0] if len(segments) == 1 else None

    def _remove(self, name: str) -> None:
        if self.dm.info(name) is None:
            return
        lower = self._lower_of(name)
        self.dm.remove(name)
        if lower is not None:
            _release_loop(lower)


def local_device(lower: str, is_file: bool, size: int, direct_io: bool = True) -> str:
    """The node of the device a disk's data is on: a block device as it is, a file through
    its loop device (applianced's own one if it has one, grown to ``size`` if the file grew;
    else a new one). Replication stacks its legs on the same device."""
    if not is_file:
        _device_number(lower)  # refuses what is not a block device
        return lower
    path = Path(lower)
    if not path.is_file():
        raise KernelError(f"the disk file {path} is missing or not a regular file")
    mine = [node for node in loop.backed_by(path) if not dm.applianced_holders(os.path.basename(node))[1]]
    for node in mine:
        if loop.size_of(node) == size:
            return node
    if mine:
        # The disk grew: its file did first, the loop device follows.
        loop.resize(mine[0], size)
        return mine[0]
    return loop.attach(path, size, direct=direct_io)


def release_local_device(node: str) -> None:
    """Let go of a loop device of applianced's: it goes once its last user closes it."""
    if os.path.basename(node).startswith("loop"):
        with contextlib.suppress(KernelError):
            loop.detach(node)


def _release_loop(major_minor: str) -> None:
    """Detach a loop device that applianced stacked a disk on; another user keeps it until it closes it."""
    if _loop_backing_file(major_minor) is not None:
        with contextlib.suppress(KernelError):
            loop.detach(_node(major_minor))


def _loop_backing_file(major_minor: str) -> str | None:
    try:
        return (SYS_DEV_BLOCK / major_minor / "loop" / "backing_file").read_text().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def _device_number(path: str) -> str:
    """``major:minor`` of a block-device node (or of a ``major:minor`` given as such)."""
    if ":" in path and not path.startswith("/"):
        return path
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KernelError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise KernelError(f"{path} is not a block device")
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _node(major_minor: str) -> str:
    return "/dev/" + os.path.basename(os.readlink(SYS_DEV_BLOCK / major_minor))


def _size(major_minor: str) -> int:
    return int((SYS_DEV_BLOCK / major_minor / "size").read_text()) * SECTOR
