"""What a node keeps of its mirrors: one record per mirrored disk, in ``replication.json``.

A record holds the disk's role on this node, the mode, what the administrator asked for,
the endpoints of the NBD export, the tunables and the generation identifiers. It lives
apart from the state file, as the pair record does: an exported configuration describes
the node's disks and targets, and importing it elsewhere must not make that node believe
it holds half of a mirror. Written atomically, mode 0600, like every file of the state
directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from applianced.replication.generations import Generation
from applianced.state import load_versioned, save_versioned

FILE_NAME = "replication.json"
FORMAT_VERSION = 1

SOURCE, TARGET = "source", "target"
SYNC, ASYNC = "sync", "async"
MODES = (SYNC, ASYNC)

# The reference's defaults (DataKeeper).
HIGH_WATER = 20000
LOW_WATER = 150
MAX_RESYNC_PASSES = 200


@dataclass(frozen=True)
class Tunables:
    """Settings that apply live."""

    high_water: int = HIGH_WATER  # writes queued for the peer (async) before the mirror pauses
    low_water: int = LOW_WATER
    throttle: int = 0  # Kbit/s for the mirror's traffic; 0 is unlimited
    max_resync_passes: int = MAX_RESYNC_PASSES


@dataclass(frozen=True)
class MirrorRecord:
    disk: str
    role: str  # SOURCE or TARGET on this node
    mode: str
    # The source's side of the NBD connection and the target's (where it serves).
    source_address: str
    target_address: str
    port: int
    size: int
    region: int
    generation: Generation
    intent: str = "mirror"  # mirror, pause or break (kept on both nodes)
    tunables: Tunables = Tunables()
    # A copy made target again after a split brain: the source merges its bitmap.
    prepared: bool = False
    # The copy is shown read-only for a backup while the mirror is paused.
    unlocked: bool = False
    # The source's bitmap must be set whole before the next resync (break, resync).
    full_resync: bool = False
    created: float = 0.0
    # The disk's name on the other node ("": the same name).
    peer_disk: str = ""
    # On the target: the copy was made for this mirror (a create that fails removes it).
    made: bool = False

    @property
    def local_address(self) -> str:
        return self.source_address if self.role == SOURCE else self.target_address

    @property
    def peer_address(self) -> str:
        return self.target_address if self.role == SOURCE else self.source_address


@dataclass(frozen=True)
class _Document:
    version: int
    mirrors: tuple[MirrorRecord, ...] = field(default=())


class RecordStore:
    """Reads and atomically replaces ``replication.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> dict[str, MirrorRecord]:
        document = load_versioned(self.path, _Document, FORMAT_VERSION)
        return {record.disk: record for record in document.mirrors} if document else {}

    def save(self, records: Mapping[str, MirrorRecord]) -> None:
        mirrors = [dataclasses.asdict(record) for record in sorted(records.values(), key=lambda r: r.disk)]
        save_versioned(self.path, {"version": FORMAT_VERSION, "mirrors": mirrors})
