"""Loop devices through their ioctls: a file seen as a block device of a set size.

A disk file carries applianced's 4 KiB trailer after its data, so its loop device is given
a size limit: the trailer is never part of the device. Direct I/O is asked for, so that
writes skip this node's page cache, where the file system can do it: the file is opened
with O_DIRECT first, because the loop driver's own check passes on overlayfs over tmpfs,
whose direct I/O then fails every request. Buffered loops still pass flushes to the file
(fsync).

Layouts are those of ``linux/loop.h`` (``LOOP_CONFIGURE`` needs Linux 5.8).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from applianced.errors import KernelError

CONTROL = "/dev/loop-control"
SYS_BLOCK = Path("/sys/block")

LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_DIRECT_IO = 16

# struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt type,
# encrypt key size, flags, file name[64], crypt name[64], key[32], init[2]
_INFO = struct.Struct("<QQQQQIIII64s64s32s2Q")
# struct loop_config: fd, block size, info, reserved[8]
_CONFIG = struct.Struct(f"<II{_INFO.size}s64x")
_ATTEMPTS = 8


def attach(path: Path, size: int, direct: bool = True, read_only: bool = False) -> str:
    """A new loop device (``/dev/loopN``) showing the first ``size`` bytes of ``path``."""
    direct = direct and _direct_io_works(path)
    flags = (LO_FLAGS_DIRECT_IO if direct else 0) | (LO_FLAGS_READ_ONLY if read_only else 0)
    name = str(path).encode()[:63]
    info = _INFO.pack(0, 0, 0, 0, size, 0, 0, 0, flags, name, b"", b"", 0, 0)
    file_fd = _open(str(path), os.O_RDONLY if read_only else os.O_RDWR)
    try:
        # Another process may take the free device between the two calls: try the next.
        for _ in range(_ATTEMPTS):
            number = _control(LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            loop_fd = _open(device, os.O_RDWR)
            try:
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, _CONFIG.pack(file_fd, 0, info))
                return device
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise KernelError(f"cannot attach {path} to {device}: {exc.strerror}") from None
            finally:
                os.close(loop_fd)
        raise KernelError(f"no free loop device for {path}")
    finally:
        os.close(file_fd)


def resize(device: str, size: int) -> None:
    """Show ``size`` bytes of the backing file from now on (the file has grown first)."""
    fd = _open(device, os.O_RDWR)
    try:
        buffer = bytearray(_INFO.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buffer, True)
        fields = list(_INFO.unpack(buffer))
        fields[4] = size
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _INFO.pack(*fields))
    except OSError as exc:
        raise KernelError(f"cannot resize {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def detach(device: str) -> None:
    """Free ``device``; it goes once its last user (a mapped device) closes it."""
    fd = _open(device, os.O_RDWR)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # nothing attached
            raise KernelError(f"cannot detach {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def backed_by(path: Path) -> list[str]:
    """The loop devices attached to ``path`` (by its real path), in number order."""
    real = os.path.realpath(path)
    found = []
    for backing in SYS_BLOCK.glob("loop*/loop/backing_file"):
        try:
            # The kernel appends " (deleted)" to a file unlinked while attached.
            text = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue  # detached meanwhile
        if os.path.realpath(text) == real:
            found.append(backing.parent.parent.name)
    return [f"/dev/{name}" for name in sorted(found, key=lambda n: int(n[4:]))]


def size_of(device: str) -> int:
    """The size in bytes that a block device shows now."""
    name = os.path.basename(os.path.realpath(device))
    return int((SYS_BLOCK / name / "size").read_text()) * 512


def _direct_io_works(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def _control(request: int) -> int:
    fd = _open(CONTROL, os.O_RDWR)
    try:
        return fcntl.ioctl(fd, request)
    except OSError as exc:
        raise KernelError(f"no loop device available: {exc.strerror}") from None
    finally:
        os.close(fd)


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(f"cannot open {path}: {exc.strerror}") from None
