"""The intent bitmap of a mirror, read from its metadata: which regions are dirty.

Each leg's metadata area (the first MiB of the leg: ``bridge.META_SECTORS``) holds md's
version-1.2 superblock 4 KiB in, and md's write-intent bitmap ``bitmap_offset`` sectors
after it: a 256-byte bitmap superblock, then one bit per region, bit ``i`` in byte
``i // 8`` at ``1 << (i % 8)`` (x86's bit order, the only one this runs on). md sets a
region's bit on disk before it writes there and clears it lazily once every leg has the
data, so the bits on disk are a superset of the regions that differ: safe to count as
dirty, and safe to merge for a resync.

What uses it: the counters (dirty blocks of the reference's GETRESYNCSTATUS), and a
switchover or split-brain recovery, where the regions either side wrote alone are the
union of both nodes' bitmaps.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from applianced.blockdev import md
from applianced.errors import InvalidArgument

SUPERBLOCK_OFFSET = 4096
MD_MAGIC = md.SUPERBLOCK_MAGIC
# md's superblock 1.x: magic at 0, the bitmap's offset (signed, in sectors from the
# superblock) at byte 96.
_MD_SUPERBLOCK = struct.Struct("<I92xi")
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
    # The event count when md last cleared bits: a member at least this recent is taken back
    # by re-add, with the marked regions copied to it.
    events_cleared: int = 0

    def dirty_regions(self) -> list[int]:
        # Byte by byte, skipping clean ones: a bitmap has up to 2**21 bits, few of them set.
        found = []
        for index, byte in enumerate(self.bits):
            if byte:
                found += [index * 8 + bit for bit in range(8) if byte >> bit & 1 and index * 8 + bit < self.regions]
        return found

    @property
    def dirty(self) -> int:
        return (int.from_bytes(self.bits, "little") & ((1 << self.regions) - 1)).bit_count()

    def ranges(self) -> list[tuple[int, int]]:
        """The dirty regions as ``[start, end)`` runs."""
        return list(runs(self.dirty_regions()))

    def merged(self, other: Bitmap) -> Bitmap:
        """The regions dirty in either bitmap (both must cover the same regions)."""
        if (self.region, self.regions) != (other.region, other.regions):
            raise InvalidArgument(
                f"bitmaps of {self.regions} x {self.region} and {other.regions} x {other.region} bytes do not match"
            )
        bits = bytes(a | b for a, b in zip(self.bits, other.bits, strict=True))
        return Bitmap(
            self.region,
            self.regions,
            max(self.events, other.events),
            bits,
            min(self.events_cleared, other.events_cleared),
        )


def runs(regions: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted region numbers as ``[start, end)`` runs."""
    start = end = None
    for region in regions:
        if end is not None and region == end:
            end += 1
            continue
        if start is not None:
            yield start, end
        start, end = region, region + 1
    if start is not None:
        yield start, end


def parse(metadata: bytes) -> Bitmap:
    """The bitmap in the bytes of a metadata area; InvalidArgument if there is none."""
    try:
        md_magic, bitmap_offset = _MD_SUPERBLOCK.unpack_from(metadata, SUPERBLOCK_OFFSET)
    except struct.error:
        raise InvalidArgument("the metadata is too short to hold a bitmap") from None
    if md_magic != MD_MAGIC or bitmap_offset <= 0:
        raise InvalidArgument("the metadata holds no md superblock with a write-intent bitmap")
    offset = SUPERBLOCK_OFFSET + bitmap_offset * 512
    try:
        magic, _, _, events, events_cleared, sync_sectors, _, region = _SUPERBLOCK.unpack_from(metadata, offset)
    except struct.error:
        raise InvalidArgument("the metadata is too short to hold a bitmap") from None
    if magic != MAGIC or region == 0:
        raise InvalidArgument("the metadata holds no write-intent bitmap")
    regions = -(-sync_sectors * 512 // region)
    start = offset + SUPERBLOCK_SIZE
    bits = metadata[start : start + -(-regions // 8)]
    if len(bits) * 8 < regions:
        raise InvalidArgument(f"the metadata is too short for a bitmap of {regions} regions")
    return Bitmap(region, regions, events, bits, events_cleared)


def cleared(metadata: bytes) -> bytes:
    """The bytes of a metadata area with every bit of its bitmap clear (InvalidArgument if
    it holds none): a copy's prepared array starts so, the copy being in sync."""
    parsed = parse(metadata)
    bitmap_offset = _MD_SUPERBLOCK.unpack_from(metadata, SUPERBLOCK_OFFSET)[1]
    start = SUPERBLOCK_OFFSET + bitmap_offset * 512 + SUPERBLOCK_SIZE
    end = start + -(-parsed.regions // 8)
    return metadata[:start] + bytes(end - start) + metadata[end:]


def has_superblock(metadata: bytes) -> bool:
    """Whether md has written its superblock to this metadata area."""
    return metadata[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 4] == MD_MAGIC.to_bytes(4, "little")


def read_metadata(path: Path) -> bytes:
    """A metadata file as md last wrote it, up to the end of its bitmap (a takeover reads
    one per disk: not the whole MiB): md writes through a loop device with direct I/O, so
    pages this process cached earlier are dropped first."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        data = f.read(SUPERBLOCK_OFFSET + _MD_SUPERBLOCK.size)
        if len(data) < SUPERBLOCK_OFFSET + _MD_SUPERBLOCK.size:
            return data
        md_magic, bitmap_offset = _MD_SUPERBLOCK.unpack_from(data, SUPERBLOCK_OFFSET)
        if md_magic != MD_MAGIC or bitmap_offset <= 0:
            return data
        offset = SUPERBLOCK_OFFSET + bitmap_offset * 512
        data += f.read(offset + SUPERBLOCK_SIZE - len(data))
        if len(data) < offset + _SUPERBLOCK.size:
            return data
        sync_sectors, region = struct.unpack_from("<Q4xI", data, offset + 40)
        regions = -(-sync_sectors * 512 // region) if region else 0
        return data + f.read(-(-regions // 8))
