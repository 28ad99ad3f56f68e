"""Disk files: the trailer that carries a disk's identity, growing, and foreign files."""

import os

import pytest

from applianced.errors import AlreadyExists, InvalidArgument
from applianced.iscsi import diskfile

MARKER = diskfile.Marker("vol1", "0b9f2c1e-8a47-4c39-9d6e-2b9a1f6f7c11", 1 << 20)


def test_create_writes_a_sparse_file_with_the_marker_after_the_lun(tmp_path):
    path = tmp_path / "vol1.img"
    diskfile.create(path, MARKER)
    assert path.stat().st_size == (1 << 20) + diskfile.TRAILER_SIZE
    assert path.read_bytes()[: 1 << 20] == bytes(1 << 20), "the LUN area starts out zeroed"
    assert diskfile.read_marker(path) == MARKER
    with pytest.raises(AlreadyExists):
        diskfile.create(path, MARKER)


def test_grow_moves_the_trailer_and_zeroes_its_old_place(tmp_path):
    path = tmp_path / "vol1.img"
    diskfile.create(path, MARKER)
    bigger = diskfile.Marker(MARKER.name, MARKER.serial, 2 << 20)
    diskfile.grow(path, MARKER, bigger)
    assert diskfile.read_marker(path) == bigger
    data = path.read_bytes()
    assert data[: 2 << 20] == bytes(2 << 20), "no trailer bytes are left inside the LUN"
    diskfile.shrink_back(path, MARKER)
    assert diskfile.read_marker(path) == MARKER


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not created by applianced"),
        (os.urandom(3 * diskfile.TRAILER_SIZE), "not created by applianced"),
        (bytes(diskfile.TRAILER_SIZE) + diskfile.MAGIC + b"{broken".ljust(4000, b"\0"), "damaged"),
    ],
)
def test_foreign_or_damaged_files_are_refused(tmp_path, content, message):
    path = tmp_path / "foreign.img"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument, match=message):
        diskfile.read_marker(path)


def test_truncated_copy_is_refused(tmp_path):
    path = tmp_path / "vol1.img"
    diskfile.create(path, MARKER)
    data = path.read_bytes()
    copy = tmp_path / "copy.img"
    copy.write_bytes(data[:4096] + data[-diskfile.TRAILER_SIZE :])
    with pytest.raises(InvalidArgument, match="marker says"):
        diskfile.read_marker(copy)
