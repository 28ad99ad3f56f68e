"""What the two nodes of a pair say to each other about mirrors, over the peer link.

Each request kind has a body dataclass (MessagePack, decoded strictly with
``decoding.unpack`` after the link verified the datagram) and an answer dataclass. Every
request is idempotent on the answering node, and the link runs each request id once, so
a retry or a repeated operation after a crash never does anything twice.

The source node asks and the target node answers; in a switchover the source asks its
copy to take over. Bitmaps travel as runs of dirty regions, in parts that fit a datagram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from applianced import decoding
from applianced.replication.generations import Generation
from applianced.replication.records import Tunables

PREPARE = "replication.prepare"
STATUS = "replication.status"
SYNCED = "replication.synced"
UPDATE = "replication.update"
RELEASE = "replication.release"
UNLOCK = "replication.unlock"
LOCK = "replication.lock"
BITMAP = "replication.bitmap"
# Renamed with its body (one disk then, many now): a node of the earlier kind refuses it by name.
TAKE_OVER = "replication.take-over-all"
GROW = "replication.grow"

# Runs of dirty regions per answer: 16 bytes each at most, well inside a datagram.
RUNS_PER_PART = 2000


@dataclass(frozen=True)
class Prepare:
    """Make (or name) the copy of a disk, lock it and serve it to the source."""

    disk: str
    size: int
    serial: str
    region: int
    mode: str
    source_address: str
    target_address: str
    tunables: Tunables
    generation: Generation
    # An existing disk of the target node to take as the copy ("": make one).
    existing: str = ""
    created: float = 0.0


@dataclass(frozen=True)
class Prepared:
    port: int
    generation: Generation
    source_address: str  # the source's address as its peer knows it: the only one the export admits


@dataclass(frozen=True)
class Disk:
    """Names the mirrored disk: the body of most requests."""

    disk: str


@dataclass(frozen=True)
class Status:
    """The answering node's half of a mirror."""

    role: str
    generation: Generation
    serving: bool
    prepared: bool
    unlocked: bool
    port: int


@dataclass(frozen=True)
class Synced:
    """The copy received everything of the source's generation (a resync completed)."""

    disk: str
    generation: Generation


@dataclass(frozen=True)
class Update:
    """Settings of the mirror changed on the source; the copy keeps them too."""

    disk: str
    mode: str
    intent: str
    tunables: Tunables
    source_address: str
    target_address: str


@dataclass(frozen=True)
class Release:
    """The mirror is deleted: the copy becomes a plain disk (with a serial of its own);
    with ``discard`` (a create that failed) a copy made for the mirror is removed."""

    disk: str
    discard: bool = False


@dataclass(frozen=True)
class Unlocked:
    node: str  # where the read-only copy can be read on the answering node


@dataclass(frozen=True)
class BitmapPart:
    """Part ``part`` of the dirty regions of the answering node's bitmap."""

    disk: str
    part: int


@dataclass(frozen=True)
class BitmapRuns:
    region: int
    regions: int
    runs: tuple[tuple[int, int], ...]
    more: bool


@dataclass(frozen=True)
class TakeOver:
    """Become the source: the old source serves its leg now; ``dirty`` are the runs its
    bitmap held, which the new source's first resync copies back."""

    disk: str
    source_address: str  # the new target (the old source) serves here
    port: int
    dirty: tuple[tuple[int, int], ...] = field(default=())


@dataclass(frozen=True)
class TakeOvers:
    """Take over every disk named, or none (one request for a whole switchover)."""

    disks: tuple[TakeOver, ...]


@dataclass(frozen=True)
class Grow:
    disk: str
    size: int


@dataclass(frozen=True)
class Done:
    """An answer with nothing to say."""


T = TypeVar("T")


def pack(message: object) -> bytes:
    return msgspec.msgpack.encode(message)


def unpack(body: bytes, schema: type[T]) -> T:
    return decoding.unpack(body, schema, f"a {schema.__name__} message")
