"""A client's proof that no acknowledged write is lost across a failover, and how long it waited.

The writer, in the client guest, writes 4 KiB blocks one after the other with O_DIRECT,
each holding a tag and its sequence number, from block ``first`` on until its stop file
appears (or ``seconds`` pass); it prints how many were acknowledged, how many failed and
the longest wait for one (the stall an application sees). The check reads every
acknowledged block back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.vm.harness import Guest

BLOCK = 4096
WRITER = """
import json, mmap, os, sys, time
device, (first, last, tag), seconds, stop = sys.argv[1], map(int, sys.argv[2:5]), float(sys.argv[5]), sys.argv[6]
fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
block = mmap.mmap(-1, 4096)
done, errors, longest, start = 0, 0, 0.0, time.monotonic()
while time.monotonic() - start < seconds and first + done < last and not os.path.exists(stop):
    block.seek(0)
    block.write(((tag << 32) | done).to_bytes(8, "big") * 512)
    began = time.monotonic()
    try:
        os.pwrite(fd, block, (first + done) * 4096)
        done += 1
    except OSError:
        errors += 1
    longest = max(longest, time.monotonic() - began)
print(json.dumps({"acknowledged": done, "errors": errors, "longest": longest}), flush=True)
"""
CHECK = """
import mmap, os, sys
device, first, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
block = mmap.mmap(-1, 4096)
for n in range(count):
    os.preadv(fd, [block], (first + n) * 4096)
    assert block[:8] == ((tag << 32) | n).to_bytes(8, "big"), n
print("ok")
"""


@dataclass(frozen=True)
class Written:
    acknowledged: int
    errors: int
    longest: float


def write_through(
    client: Guest,
    device: str,
    blocks: range,
    tag: int,
    event: Callable[[], None],
    lead: float = 8,
    tail: float = 8,
    limit: float = 300,
) -> Written:
    """Write ``blocks`` while ``event()`` happens ``lead`` seconds in, and for ``tail``
    seconds after it returned (at most ``limit`` seconds in all); then check that every
    acknowledged block reads back as written. The writer must still run when the event
    is over: a stall it did not see would not count."""
    name = f"sequenced-writer-{tag}"
    stop = f"/tmp/{name}.stop"
    client.write_file("/tmp/sequenced_writer.py", WRITER)
    client.write_file("/tmp/sequenced_check.py", CHECK)
    client.run(["rm", "-f", stop])
    client.spawn(name, f"python3 /tmp/sequenced_writer.py {device} {blocks.start} {blocks.stop} {tag} {limit} {stop}")
    time.sleep(lead)
    event()
    assert client.status(name) is None, "the writer ended before the event did: give it more blocks or time"
    time.sleep(tail)
    client.run(["touch", stop])
    client.wait_exit(name, timeout=120)
    written = Written(**json.loads(client.spawn_log(name).strip().splitlines()[-1]))
    if written.acknowledged:
        check = f"python3 /tmp/sequenced_check.py {device} {blocks.start} {written.acknowledged} {tag}"
        assert client.run(check, timeout=300).stdout.strip() == "ok", "an acknowledged write was lost"
    return written
