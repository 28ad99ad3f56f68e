"""The intent bitmap read from metadata bytes laid out as md writes them (version 1.2).

That the layout is the kernel's is proven in tests/vm/test_replication.py, whose resyncs
after an outage copy exactly the regions written meanwhile, as this bitmap tracks them."""

import struct

import pytest

from applianced.blockdev import md
from applianced.errors import InvalidArgument, KernelError
from applianced.replication import bitmap

REGION = 64 * 1024
# md's bitmap 8 sectors after its superblock, as mdadm places it in the metadata area.
BITMAP_OFFSET = bitmap.SUPERBLOCK_OFFSET + 8 * 512


def metadata(regions, dirty, *, events=7, magic=bitmap.MAGIC, md_magic=bitmap.MD_MAGIC):
    md_superblock = struct.pack("<I92xi", md_magic, 8)
    sync_sectors = regions * REGION // 512
    superblock = struct.pack("<II16sQQQII", magic, 4, bytes(16), events, 0, sync_sectors, 0, REGION)
    bits = bytearray(-(-regions // 8))
    for region in dirty:
        bits[region // 8] |= 1 << (region % 8)
    head = bytes(bitmap.SUPERBLOCK_OFFSET) + md_superblock.ljust(4096, b"\0")
    return head + superblock.ljust(bitmap.SUPERBLOCK_SIZE, b"\0") + bytes(bits) + bytes(512)


def test_dirty_regions_are_read_in_the_kernels_bit_order():
    parsed = bitmap.parse(metadata(1024, [0, 7, 8, 100, 1023]))
    assert (parsed.region, parsed.regions, parsed.events) == (REGION, 1024, 7)
    assert parsed.dirty_regions() == [0, 7, 8, 100, 1023]
    assert parsed.dirty == 5


def test_bits_past_the_last_region_are_not_counted():
    data = bytearray(metadata(10, [9]))
    data[BITMAP_OFFSET + bitmap.SUPERBLOCK_SIZE + 1] |= 0b1111_1100  # regions 10..15 do not exist
    assert bitmap.parse(bytes(data)).dirty_regions() == [9]


def test_merging_takes_regions_dirty_on_either_side():
    ours, theirs = bitmap.parse(metadata(64, [1, 2], events=3)), bitmap.parse(metadata(64, [2, 40], events=9))
    merged = ours.merged(theirs)
    assert merged.dirty_regions() == [1, 2, 40] and merged.events == 9
    with pytest.raises(InvalidArgument, match="do not match"):
        ours.merged(bitmap.parse(metadata(128, [])))


@pytest.mark.parametrize(
    ("data", "sentence"),
    [
        (bytes(16384), "no md superblock"),
        (metadata(64, [], md_magic=0x12345678), "no md superblock"),
        (metadata(64, [], magic=0x12345678), "no write-intent bitmap"),
        (bytes(100), "too short to hold"),
        (metadata(1 << 20, [])[: BITMAP_OFFSET + bitmap.SUPERBLOCK_SIZE + 10], "too short for a bitmap"),
    ],
)
def test_metadata_without_a_bitmap_is_a_named_error(data, sentence):
    with pytest.raises(InvalidArgument, match=sentence):
        bitmap.parse(data)


def test_dirty_regions_come_as_runs_and_are_counted_without_a_loop_over_every_bit():
    parsed = bitmap.parse(metadata(1 << 20, [0, 1, 2, 7, 9, 10, 1048575]))
    assert parsed.ranges() == [(0, 3), (7, 8), (9, 11), (1048575, 1048576)]
    assert parsed.dirty == 7
    assert bitmap.has_superblock(metadata(8, [])) and not bitmap.has_superblock(bytes(8192))


def test_a_grown_member_carries_its_new_size_under_a_valid_checksum(tmp_path):
    max_dev = 3
    superblock = bytearray(256 + 2 * max_dev)
    struct.pack_into("<I", superblock, 0, bitmap.MD_MAGIC)
    struct.pack_into("<QQ", superblock, 128, 2048, 65536)  # data_offset, data_size
    struct.pack_into("<Q", superblock, 80, 65536)
    struct.pack_into("<I", superblock, 220, max_dev)
    superblock[256:] = b"\x00\x00\x01\x00\xfe\xff"  # roles 0, 1 and a spare
    meta = tmp_path / "d1.meta"
    meta.write_bytes(bytes(bitmap.SUPERBLOCK_OFFSET) + superblock.ljust(4096, b"\0") + bytes(4096))

    md.set_member_size(meta, bitmap.SUPERBLOCK_OFFSET, 98304)

    written = meta.read_bytes()[bitmap.SUPERBLOCK_OFFSET :]
    assert struct.unpack_from("<Q", written, 80)[0] == struct.unpack_from("<Q", written, 136)[0] == 98304
    assert struct.unpack_from("<Q", written, 128)[0] == 2048, "the data stays where it is"
    # The kernel's sum: 32-bit words of the header and the roles (the odd role last, as
    # 16 bits), checksum as zero.
    words = struct.unpack("<64I", written[:256])
    total = sum(words) - words[216 // 4] + 0x0001_0000 + 0xFFFE
    assert struct.unpack_from("<I", written, 216)[0] == (total & 0xFFFFFFFF) + (total >> 32)


def test_a_file_without_a_superblock_is_not_written(tmp_path):
    meta = tmp_path / "blank.meta"
    meta.write_bytes(bytes(8192))
    with pytest.raises(KernelError, match="no md superblock"):
        md.set_member_size(meta, bitmap.SUPERBLOCK_OFFSET, 98304)
    assert meta.read_bytes() == bytes(8192)


def array_superblock(number=1, roles=(0, 1, 0xFFFE), events=50):
    superblock = bytearray(4096)
    struct.pack_into("<I", superblock, 0, bitmap.MD_MAGIC)
    superblock[16:32] = bytes(range(16))  # the array's uuid
    struct.pack_into("<I", superblock, 160, number)
    superblock[168:184] = b"\x11" * 16  # this member's uuid
    struct.pack_into("<Q", superblock, 200, events)
    struct.pack_into("<I", superblock, 220, len(roles))
    struct.pack_into(f"<{len(roles)}H", superblock, 256, *roles)
    struct.pack_into("<I", superblock, 216, md.superblock_checksum(bytes(superblock)))
    return bytes(superblock)


def test_the_other_legs_superblock_is_the_arrays_own_with_number_slot_and_age_of_the_other():
    own = array_superblock(number=1, roles=(0xFFFE, 0, 0xFFFF))  # this leg: number 1, in slot 0

    made = md.member_superblock(own, events=41)

    assert struct.unpack_from("<I", made, 160)[0] == 0, "the other member's number"
    assert struct.unpack_from("<3H", made, 256) == (1, 0, 0xFFFF), "in the other slot, this leg's kept"
    assert struct.unpack_from("<Q", made, 200)[0] == 41
    assert made[184] & 1, "write-mostly: the peer's side"
    assert made[16:32] == own[16:32], "the same array"
    assert made[168:184] != own[168:184], "a device of its own"
    assert struct.unpack_from("<I", made, 216)[0] == md.superblock_checksum(made)
    assert len(made) == 4096


@pytest.mark.parametrize(
    ("own", "sentence"),
    [
        (bytes(4096), "no md superblock"),
        (array_superblock(number=2, roles=(0, 1, 0)), "not a member of a two-leg array"),
        (array_superblock(number=1, roles=(0, 0xFFFE)), "not a member of a two-leg array"),
    ],
)
def test_no_superblock_is_made_from_what_is_no_two_leg_member(own, sentence):
    with pytest.raises(KernelError, match=sentence):
        md.member_superblock(own, events=1)


def test_the_bitmap_tells_when_md_last_cleared_bits():
    data = bytearray(metadata(64, [3]))
    struct.pack_into("<Q", data, BITMAP_OFFSET + 32, 39)  # events_cleared
    assert bitmap.parse(bytes(data)).events_cleared == 39


def test_a_metadata_file_is_read_up_to_its_bitmaps_end(tmp_path):
    data = metadata(1000, [5, 999])  # 125 bytes of bits
    meta = tmp_path / "d1.meta"
    meta.write_bytes(data.ljust(1 << 20, b"\xff"))  # beyond the bitmap: whatever
    read = bitmap.read_metadata(meta)
    assert len(read) == BITMAP_OFFSET + bitmap.SUPERBLOCK_SIZE + 125
    assert bitmap.parse(read).dirty_regions() == [5, 999]
    blank = tmp_path / "blank.meta"
    blank.write_bytes(bytes(1 << 20))
    assert not bitmap.has_superblock(bitmap.read_metadata(blank))


def test_a_forked_bitmap_starts_clear_and_keeps_the_rest():
    data = metadata(1000, [0, 5, 999])
    clear = bitmap.cleared(data)
    assert len(clear) == len(data)
    assert bitmap.parse(clear).dirty == 0
    assert clear[: BITMAP_OFFSET + bitmap.SUPERBLOCK_SIZE] == data[: BITMAP_OFFSET + bitmap.SUPERBLOCK_SIZE]
    with pytest.raises(InvalidArgument):
        bitmap.cleared(bytes(8192))
