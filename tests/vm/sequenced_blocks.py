"""The client's side of the no-lost-write proof, as a script of its own (standard library
only): run in a test guest by tests/vm/sequenced_writes.py, and on the Vagrant client by
vagrant/failover-scenario.

    sequenced_blocks.py write DEVICE FIRST LAST TAG SECONDS STOP_FILE
        Write 4 KiB blocks one after the other with O_DIRECT, each holding the tag and its
        sequence number, from block FIRST on, until block LAST, STOP_FILE exists or SECONDS
        pass; print, as JSON, how many were acknowledged, how many failed and the longest
        wait for one (the stall an application sees).
    sequenced_blocks.py check DEVICE FIRST COUNT TAG
        Read the COUNT blocks from FIRST on back; print "ok" if each holds what was written,
        else exit 1 naming the first block that does not.
"""

import json
import mmap
import os
import sys
import time

BLOCK = 4096


def content(tag: int, number: int) -> bytes:
    return ((tag << 32) | number).to_bytes(8, "big") * (BLOCK // 8)


def write(device: str, first: int, last: int, tag: int, seconds: float, stop: str) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    done, errors, longest, start = 0, 0, 0.0, time.monotonic()
    while time.monotonic() - start < seconds and first + done < last and not os.path.exists(stop):
        block.seek(0)
        block.write(content(tag, done))
        began = time.monotonic()
        try:
            os.pwrite(fd, block, (first + done) * BLOCK)
            done += 1
        except OSError:
            errors += 1
        longest = max(longest, time.monotonic() - began)
    print(json.dumps({"acknowledged": done, "errors": errors, "longest": longest}), flush=True)


def check(device: str, first: int, count: int, tag: int) -> None:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    block = mmap.mmap(-1, BLOCK)
    for number in range(count):
        os.preadv(fd, [block], (first + number) * BLOCK)
        if block[:] != content(tag, number):
            sys.exit(f"block {first + number} does not hold write {number} of tag {tag}")
    print("ok")


if __name__ == "__main__":
    command, device, *numbers = sys.argv[1:]
    if command == "write":
        write(device, int(numbers[0]), int(numbers[1]), int(numbers[2]), float(numbers[3]), numbers[4])
    else:
        check(device, *(int(n) for n in numbers))
