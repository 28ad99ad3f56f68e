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

from tests.vm.harness import REPO_ROOT, Guest

# The client's script: guests share the host's root, so they run it from the checkout.
SCRIPT = REPO_ROOT / "tests" / "vm" / "sequenced_blocks.py"
BLOCK = 4096


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
    client.run(["rm", "-f", stop])
    client.spawn(name, f"python3 {SCRIPT} write {device} {blocks.start} {blocks.stop} {tag} {limit} {stop}")
    time.sleep(lead)
    event()
    assert client.status(name) is None, "the writer ended before the event did: give it more blocks or time"
    time.sleep(tail)
    client.run(["touch", stop])
    client.wait_exit(name, timeout=120)
    written = Written(**json.loads(client.spawn_log(name).strip().splitlines()[-1]))
    if written.acknowledged:
        check = f"python3 {SCRIPT} check {device} {blocks.start} {written.acknowledged} {tag}"
        assert client.run(check, timeout=300).stdout.strip() == "ok", "an acknowledged write was lost"
    return written
