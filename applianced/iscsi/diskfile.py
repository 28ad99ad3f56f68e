"""Backing files of virtual disks, and the marker that proves applianced made them.

A disk file holds the LUN's bytes followed by one 4 KiB trailer that LIO never exports
(the fileio backstore is given the LUN size, not the file size). The trailer records the
disk's identity (unit serial), size and name, so a file copied to another server can be
imported there with the same identity, and a file applianced did not make is refused. The
trailer travels with the file, unlike an extended attribute or a side file.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from applianced import decoding
from applianced.errors import AlreadyExists, InvalidArgument

TRAILER_SIZE = 4096
MAGIC = b"APPLIANCED-DISK\n"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Marker:
    """What the trailer records."""

    name: str
    serial: str
    size: int


@dataclass(frozen=True)
class _Trailer:
    """The trailer's JSON: a marker and the format it was written in."""

    version: int
    name: str
    serial: str
    size: int


def file_size(disk_size: int) -> int:
    return disk_size + TRAILER_SIZE


@contextlib.contextmanager
def open_regular(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    """A descriptor of ``path`` if it is a regular file, without ever blocking on it.

    The path is opened with O_PATH first, which opens nothing (a FIFO does not wait for a
    writer, a device driver is not called), and only a regular file is then reopened
    for I/O through /proc/self/fd, so that the file checked is the file used.
    """
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise InvalidArgument(f"{path} is not a regular file")
        try:
            fd = os.open(f"/proc/self/fd/{handle}", flags | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(f"cannot open {path}: {exc.strerror}") from None
    finally:
        os.close(handle)
    try:
        yield fd
    finally:
        os.close(fd)


def create(path: Path, marker: Marker) -> None:
    """Create a sparse file for a disk of ``marker.size`` bytes; never take over a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists already; applianced does not overwrite files") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, file_size(marker.size))
        _write_trailer(fd, marker)
        os.fsync(fd)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InvalidArgument(f"cannot write {path}: {exc.strerror}") from None
        raise
    finally:
        os.close(fd)


def grow(path: Path, old: Marker, new: Marker) -> None:
    """Make room for ``new.size`` bytes; the old trailer becomes zeroed LUN space."""
    with open_regular(path, os.O_RDWR) as fd:
        # A size the file system refuses (EFBIG) fails here, before anything changed.
        os.ftruncate(fd, file_size(new.size))
        try:
            # The new trailer is written before the old one is wiped, so a crash in between
            # leaves a file whose last 4 KiB are still a valid trailer. When the disk grows
            # by less than a trailer, the new trailer covers the old one's tail: only the
            # part below it is wiped.
            _write_trailer(fd, new)
            os.fsync(fd)
            os.pwrite(fd, bytes(min(TRAILER_SIZE, new.size - old.size)), old.size)
            os.fsync(fd)
        except OSError:
            _restore(fd, old)
            raise


def shrink_back(path: Path, old: Marker) -> None:
    """Undo ``grow`` when the kernel refused the new size (the grown area was never exported)."""
    with open_regular(path, os.O_RDWR) as fd:
        _restore(fd, old)


def _restore(fd: int, old: Marker) -> None:
    os.ftruncate(fd, file_size(old.size))
    _write_trailer(fd, old)
    os.fsync(fd)


def has_marker(path: Path) -> bool:
    try:
        read_marker(path)
    except InvalidArgument:
        return False
    return True


def check_adoptable(path: Path, marker: Marker) -> None:
    """InvalidArgument unless ``adopt`` can take the file: regular, exactly the LUN's size."""
    with open_regular(path) as fd:
        size = os.fstat(fd).st_size
    if size != marker.size:
        raise InvalidArgument(f"{path} is {size} bytes, not the {marker.size} its backstore exports; not adopting it")


def adopt(path: Path, marker: Marker) -> None:
    """Append a trailer to a file made by another tool, whose size is exactly the LUN's."""
    check_adoptable(path, marker)
    with open_regular(path, os.O_RDWR) as fd:
        _write_trailer(fd, marker)
        os.fsync(fd)


def unadopt(path: Path, size: int) -> None:
    """Take an adopted file back to its size before ``adopt``."""
    with open_regular(path, os.O_RDWR) as fd:
        os.ftruncate(fd, size)
        os.fsync(fd)


def rename(path: Path, marker: Marker) -> None:
    """Record another name in the trailer (a disk imported under a new name)."""
    with open_regular(path, os.O_RDWR) as fd:
        if os.fstat(fd).st_size != file_size(marker.size):
            raise InvalidArgument(f"{path} is no longer {file_size(marker.size)} bytes; not renaming its disk")
        _write_trailer(fd, marker)
        os.fsync(fd)


def read_marker(path: Path) -> Marker:
    """The marker of a disk file; InvalidArgument if applianced did not make the file."""
    with open_regular(path) as fd:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            raise _foreign(path)
        try:
            trailer = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
    if not trailer.startswith(MAGIC):
        raise _foreign(path)
    what = f"the applianced marker of {path}"
    data = decoding.decode(trailer[len(MAGIC) :].rstrip(b"\0"), _Trailer, what)
    if data.version != FORMAT_VERSION:
        raise InvalidArgument(f"{what} has format version {data.version}, not {FORMAT_VERSION}")
    marker = Marker(data.name, data.serial, data.size)
    if file_size(marker.size) != size:
        raise InvalidArgument(f"{path} is {size} bytes but its marker says {file_size(marker.size)}")
    return marker


def _foreign(path: Path) -> InvalidArgument:
    return InvalidArgument(f"{path} was not created by applianced (no applianced marker at its end); not importing it")


def _write_trailer(fd: int, marker: Marker) -> None:
    payload = MAGIC + json.dumps({"version": FORMAT_VERSION, **asdict(marker)}, sort_keys=True).encode()
    if len(payload) > TRAILER_SIZE:
        raise InvalidArgument("disk marker does not fit its trailer")
    os.pwrite(fd, payload.ljust(TRAILER_SIZE, b"\0"), marker.size)
