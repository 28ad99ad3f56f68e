"""Whether each disk's backing is there, and the events that may change the answer.

A disk whose file or device is absent (a file system that did not mount, a drive that
failed or was pulled) is *missing*: the engine leaves it out of the kernel, so that LIO
never serves zeros where the data was, and serves every other disk. Block devices are
watched through udev (pyudev): a device that goes away turns its disk missing at once,
one that comes back brings its disk back. Mount changes are watched through
/proc/self/mountinfo, whose poll reports every change of the mount table. A file copied
back into place brings no event at all, so the engine also looks again every few
seconds while a disk is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from applianced.errors import InvalidArgument
from applianced.iscsi import diskfile
from applianced.state import Disk

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"


def absence(disk: Disk, thorough: bool) -> str | None:
    """Why ``disk`` cannot be served now, or None if its backing is there.

    A block device is looked up every time: it may vanish under a running target. A file
    that LIO holds open cannot vanish (its file system cannot be unmounted), so its
    trailer is read only when ``thorough``: at start-up and while it is missing, when the
    file that appears must be the disk's own and not another one at the same path.
    """
    if disk.kind == "block":
        try:
            mode = os.stat(disk.path).st_mode
        except OSError as exc:
            return f"device {disk.path} is gone ({exc.strerror})"
        return None if stat.S_ISBLK(mode) else f"{disk.path} is no longer a block device"
    if not thorough:
        return None
    try:
        marker = diskfile.read_marker(Path(disk.path))
    except InvalidArgument as exc:
        return str(exc)
    if marker != diskfile.Marker(disk.name, disk.serial, disk.size):
        return f"{disk.path} holds disk {marker.name!r} (serial {marker.serial}), not this one"
    return None


def absent(disks: Iterable[Disk], thorough: Iterable[str] | bool) -> dict[str, str]:
    """The disks that are missing, with the reason for each.

    ``thorough`` is True to read every file's trailer, or the names of the disks whose
    trailer to read (those missing now).
    """
    names = set() if thorough is True else set(thorough)
    return {
        disk.name: reason
        for disk in disks
        if (reason := absence(disk, thorough is True or disk.name in names)) is not None
    }


class BackingEvents:
    """Wakes its waiter when a block device comes or goes, or the mount table changes."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._monitor: Any = None
        self._mounts: Any = None
        self._mountinfo: Any = None

    async def start(self) -> None:
        """Subscribe to udev and to the mount table; either may be unavailable (logged)."""
        loop = asyncio.get_running_loop()
        try:
            # pyudev is imported here, off the daemon's start-up path (about a second of
            # imports under emulation), and in a worker thread.
            self._monitor = await asyncio.to_thread(_block_monitor)
            loop.add_reader(self._monitor.fileno(), self._drain_udev)
        except (ImportError, OSError) as exc:
            log.warning("cannot watch block devices through udev (%s): a vanished device goes unnoticed", exc)
        try:
            # mountinfo signals a change of the mount table as POLLPRI, never as readable:
            # an epoll set waits for it, and the loop waits for the epoll set.
            self._mountinfo = open(MOUNTINFO, "rb")  # noqa: SIM115 (closed in close())
            self._mounts = select.epoll()
            self._mounts.register(self._mountinfo.fileno(), select.EPOLLPRI | select.EPOLLERR)
            loop.add_reader(self._mounts.fileno(), self._drain_mounts)
        except OSError as exc:
            log.warning("cannot watch the mount table (%s): missing disks are looked at every few seconds", exc)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for source in (self._monitor, self._mounts, self._mountinfo):
            if source is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(source.fileno())
        for closable in (self._mounts, self._mountinfo):
            if closable is not None:
                closable.close()

    def _drain_udev(self) -> None:
        while (device := self._monitor.poll(timeout=0)) is not None:
            log.debug("udev: %s %s", device.action, device.device_node or device.sys_name)
            self._changed.set()

    def _drain_mounts(self) -> None:
        # Polling the file records the change as seen: the next poll is quiet again.
        if self._mounts.poll(0):
            self._changed.set()

    async def wait(self, timeout: float | None) -> None:
        """Until something changed, or ``timeout`` seconds (None: no limit)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()


def _block_monitor() -> Any:
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("block")
    monitor.start()
    return monitor
