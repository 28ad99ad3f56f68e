"""What the two nodes say to each other about failover, over the authenticated peer link.

Beats go both ways every interval: each node's request carries its view and the answer
the peer's, so each node hears the other twice per interval, over the heartbeat path and
the auxiliary one in turn. Every other request is idempotent on the answering node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from applianced.failover.records import FailoverRecord
from applianced.failover.tickle import Connection
from applianced.state import Target

BEAT = "failover.beat"
START = "failover.start"
STOP = "failover.stop"
# A hand-over in two steps, so that the virtual IPs are never on both nodes: the peer
# checks it can take over, this node stops serving, then the peer takes over.
CAN_TAKE_OVER = "failover.can-take-over"
TAKE_OVER = "failover.take-over"
# A node that yielded to the peer's takeover: its disks are copies again, the peer may
# resync them (partially: the bitmaps of both sides are merged).
COPIES_READY = "failover.copies-ready"
# The active node's definition of a protected target, kept ready (disabled) on the passive.
PREPARE_TARGET = "failover.prepare-target"
# The persistent reservations (APTPL) that the active node's LIO saved for a protected disk,
# kept on the passive node for the backstore its takeover makes.
PREPARE_RESERVATIONS = "failover.prepare-reservations"


@dataclass(frozen=True)
class Beat:
    role: str
    ping_node_reached: bool
    active_since: float
    # The active node's disks under its protected targets (its names): the copies the
    # passive node must hold in sync to take over.
    protected: tuple[str, ...] = field(default=())
    # The active node's: the clients' connections to the virtual IPs, which the passive
    # node resets right after it took over (``tickle``).
    connections: tuple[Connection, ...] = field(default=())


@dataclass(frozen=True)
class Start:
    """Become the passive node of a cluster with these settings (the active node's)."""

    settings: FailoverRecord


@dataclass(frozen=True)
class Reason:
    reason: str


@dataclass(frozen=True)
class HandOver:
    """Serve now: the old active node's reason, and its clients' connections as they were
    when it held its portals (the ones the new active node resets)."""

    reason: str
    connections: tuple[Connection, ...] = field(default=())


@dataclass(frozen=True)
class Problems:
    """What keeps the answering node from its part ("" problems: none)."""

    problems: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Disks:
    """Disks by the answering node's names."""

    disks: tuple[str, ...]


@dataclass(frozen=True)
class SealedChap:
    """The CHAP secrets of a target ("" initiator) or of one of its ACLs, encrypted
    (``peer.secrets``): the link authenticates what it carries but does not hide it."""

    initiator: str
    secret: bytes = b""
    mutual_secret: bytes = b""


@dataclass(frozen=True)
class PreparedTarget:
    """A protected target as the active node defines it, its CHAP secrets blanked."""

    target: Target
    secrets: tuple[SealedChap, ...] = field(default=())


@dataclass(frozen=True)
class SavedReservations:
    """What LIO saved of a disk's persistent reservations ("" nothing), by the sender's name."""

    disk: str
    saved: str


@dataclass(frozen=True)
class Done:
    """An answer with nothing to say."""
