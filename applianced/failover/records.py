"""What a node keeps of its failover: settings, its role, and the history of role changes.

One record in ``failover.json`` (atomic, 0600, like every file of the state directory),
apart from the state file for the reason the mirror records are: an exported
configuration must not make another node believe it is half of a cluster. The role is
kept so that a restarted daemon knows whether it served; the history so that "why did
the last failover happen, and how long did each step take" survives the restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from applianced.errors import InvalidArgument
from applianced.failover.addresses import VirtualAddress
from applianced.state import load_versioned, save_versioned

FILE_NAME = "failover.json"
FORMAT_VERSION = 1
# Role changes kept in the record (older ones are in the journal).
HISTORY = 32

# Heartbeats: one every INTERVAL seconds; the peer is silent after MISSES in a row. The
# floor keeps a beat's round trip (milliseconds, more under emulation) inside its interval;
# two misses at least, because beats alternate between the heartbeat and the auxiliary path.
INTERVAL, MISSES = 1.0, 3
MIN_INTERVAL, MAX_INTERVAL = 0.1, 10.0
MIN_MISSES, MAX_MISSES = 2, 30


@dataclass(frozen=True, order=True)
class PingNode:
    address: str
    interface: str


@dataclass(frozen=True)
class Event:
    """One role change (or refusal): when, what this node became, why, and its steps."""

    time: float
    role: str
    reason: str
    # (step, seconds) in the order they ran.
    steps: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class FailoverRecord:
    addresses: tuple[VirtualAddress, ...] = ()
    ping_nodes: tuple[PingNode, ...] = ()
    # Protected targets, by name (on the active node's side).
    targets: tuple[str, ...] = ()
    interval: float = INTERVAL
    misses: int = MISSES
    role: str = "stopped"
    # When this node last became active (Unix time, 0: never); of two nodes that both
    # believe they serve, the later one took over from the other.
    active_since: float = 0.0
    history: tuple[Event, ...] = field(default=())

    @property
    def deadline(self) -> float:
        """Seconds without a beat after which the peer is silent."""
        return self.interval * self.misses

    def with_event(self, event: Event) -> FailoverRecord:
        return dataclasses.replace(self, history=(*self.history, event)[-HISTORY:])


def check_heartbeat(interval: float, misses: int) -> None:
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise InvalidArgument(f"heartbeat interval {interval:g} s is outside {MIN_INTERVAL:g}-{MAX_INTERVAL:g} s")
    if not MIN_MISSES <= misses <= MAX_MISSES:
        raise InvalidArgument(f"{misses} missed heartbeats is outside {MIN_MISSES}-{MAX_MISSES}")


@dataclass(frozen=True)
class _Document:
    version: int
    failover: FailoverRecord


class FailoverStore:
    """Reads and atomically replaces ``failover.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> FailoverRecord:
        document = load_versioned(self.path, _Document, FORMAT_VERSION)
        return document.failover if document else FailoverRecord()

    def save(self, record: FailoverRecord) -> None:
        save_versioned(self.path, {"version": FORMAT_VERSION, "failover": dataclasses.asdict(record)})
