"""Backing files of virtual disks, and the marker that proves applianced made them.

A disk file holds the LUN's bytes followed by one 4 KiB trailer that LIO never exports
(the fileio backstore is given the LUN size, not the file size). The trailer records the
disk's identity (unit serial), size and name, so a file copied to another server can be
imported there with the same identity, and a file applianced did not make is refused. The
trailer travels with the file, unlike an extended attribute or a side file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

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


def file_size(disk_size: int) -> int:
    return disk_size + TRAILER_SIZE


def create(path: Path, marker: Marker) -> None:
    """Create a sparse file for a disk of ``marker.size`` bytes; never take over a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists already; applianced does not overwrite files") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, file_size(marker.size))
        _write_trailer(fd, marker)
        os.fsync(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise InvalidArgument(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def grow(path: Path, old: Marker, new: Marker) -> None:
    """Make room for ``new.size`` bytes; the old trailer becomes zeroed LUN space."""
    with path.open("r+b") as file:
        fd = file.fileno()
        os.ftruncate(fd, file_size(new.size))
        # The new trailer is written before the old one is wiped, so a crash in between
        # leaves a file whose last 4 KiB are still a valid trailer.
        _write_trailer(fd, new)
        os.fsync(fd)
        os.pwrite(fd, bytes(TRAILER_SIZE), old.size)
        os.fsync(fd)


def shrink_back(path: Path, old: Marker) -> None:
    """Undo ``grow`` when the kernel refused the new size (the grown area was never exported)."""
    with path.open("r+b") as file:
        os.ftruncate(file.fileno(), file_size(old.size))
        _write_trailer(file.fileno(), old)
        os.fsync(file.fileno())


def has_marker(path: Path) -> bool:
    try:
        read_marker(path)
    except InvalidArgument:
        return False
    return True


def adopt(path: Path, marker: Marker) -> None:
    """Append a trailer to a file made by another tool, whose size is exactly the LUN's."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
    if size != marker.size:
        raise InvalidArgument(f"{path} is {size} bytes, not the {marker.size} its backstore exports; not adopting it")
    with path.open("r+b") as file:
        _write_trailer(file.fileno(), marker)
        os.fsync(file.fileno())


def unadopt(path: Path, size: int) -> None:
    """Take an adopted file back to its size before ``adopt``."""
    os.truncate(path, size)


def read_marker(path: Path) -> Marker:
    """The marker of a disk file; InvalidArgument if applianced did not make the file."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size < TRAILER_SIZE:
                raise _foreign(path)
            trailer = os.pread(file.fileno(), TRAILER_SIZE, size - TRAILER_SIZE)
    except FileNotFoundError:
        raise InvalidArgument(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
    if not trailer.startswith(MAGIC):
        raise _foreign(path)
    try:
        data = json.loads(trailer[len(MAGIC) :].rstrip(b"\0"))
        if data.pop("version") != FORMAT_VERSION:
            raise ValueError("unknown version")
        marker = Marker(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(f"{path} has a damaged applianced marker: {exc}") from None
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
