"""The intent bitmap of a mirror, read from its metadata: which regions are dirty.

dm-raid keeps md's write-intent bitmap on each leg's metadata device, 4 KiB in (after
dm-raid's own superblock): a 256-byte bitmap superblock, then one bit per region, bit
``i`` in byte ``i // 8`` at ``1 << (i % 8)`` (x86's bit order, the only one this runs
on). md sets a region's bit on disk before it writes there and clears it lazily once
every leg has the data, so the bits on disk are a superset of the regions that differ:
safe to count as dirty, and safe to merge for a resync.

What uses it: the counters (dirty blocks of the reference's GETRESYNCSTATUS), and a
switchover or split-brain recovery, where the regions either side wrote alone are the
union of both nodes' bitmaps.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from applianced.errors import InvalidArgument

OFFSET = 4096
SUPERBLOCK_SIZE = 256
MAGIC = 0x6D746962  # "bitm"
# magic, version, uuid, events, events_cleared, sync_size (sectors), state, chunksize (bytes)
_SUPERBLOCK = struct.Struct("<II16sQQQII")


@dataclass(frozen=True)
class Bitmap:
    region: int  # bytes per bit
    regions: int
    events: int
    bits: bytes

    def dirty_regions(self) -> list[int]:
        return [i for i in range(self.regions) if self.bits[i // 8] >> (i % 8) & 1]

    @property
    def dirty(self) -> int:
        return len(self.dirty_regions())

    def merged(self, other: Bitmap) -> Bitmap:
        """The regions dirty in either bitmap (both must cover the same regions)."""
        if (self.region, self.regions) != (other.region, other.regions):
            raise InvalidArgument(
                f"bitmaps of {self.regions} x {self.region} and {other.regions} x {other.region} bytes do not match"
            )
        bits = bytes(a | b for a, b in zip(self.bits, other.bits, strict=True))
        return Bitmap(self.region, self.regions, max(self.events, other.events), bits)


def parse(metadata: bytes) -> Bitmap:
    """The bitmap in the bytes of a metadata device; InvalidArgument if there is none."""
    try:
        magic, _, _, events, _, sync_sectors, _, region = _SUPERBLOCK.unpack_from(metadata, OFFSET)
    except struct.error:
        raise InvalidArgument("the metadata is too short to hold a bitmap") from None
    if magic != MAGIC or region == 0:
        raise InvalidArgument("the metadata holds no write-intent bitmap")
    regions = -(-sync_sectors * 512 // region)
    start = OFFSET + SUPERBLOCK_SIZE
    bits = metadata[start : start + -(-regions // 8)]
    if len(bits) * 8 < regions:
        raise InvalidArgument(f"the metadata is too short for a bitmap of {regions} regions")
    return Bitmap(region, regions, events, bits)


def read_metadata(path: Path) -> bytes:
    """A metadata file as md last wrote it: md writes through a loop device with direct
    I/O, so pages this process cached earlier are dropped first."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()
