"""Generation identifiers: who wrote a volume without the peer, and what a reconnection may do.

Each node keeps, per volume, its ``current`` generation (a random identifier of the data it
holds) and its ``bitmap`` generation: the current one at the moment its bitmap started
recording writes that the peer does not have (empty while nothing is recorded). A node
that starts writing without its peer (a source that lost the peer's leg, a copy promoted
by force) moves to a new current generation and keeps the old one as its bitmap's.

When the source meets its copy again, the two pairs tell what happened, as DRBD's
generation UUIDs do:

- the same current generation: nothing was written apart that the bitmap does not hold;
- the copy's current is the source's bitmap generation: only the source wrote, and its
  bitmap holds every region that differs;
- the copy was made a target again on purpose after both wrote (the reference's
  PREPARETOBECOMETARGET) and both bitmaps start from the same generation: the copy's
  changes are overwritten, the regions of both bitmaps copied;
- anything else is split brain (both wrote, nobody chose) or unrelated data: refused,
  never resolved silently.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

HISTORY = 4


@dataclass(frozen=True)
class Generation:
    current: str
    bitmap: str = ""
    # Earlier current generations, newest first: what a node held before.
    history: tuple[str, ...] = field(default=())

    @classmethod
    def new(cls) -> Generation:
        return cls(_identifier())

    def diverged(self) -> Generation:
        """This node starts writing without its peer (nothing if it already does)."""
        if self.bitmap:
            return self
        return Generation(_identifier(), self.current, (self.current, *self.history)[:HISTORY])

    def synced_to(self, source: Generation) -> Generation:
        """This copy received everything of ``source``'s current generation."""
        return Generation(source.current, "", (self.current, *self.history)[:HISTORY])

    def caught_up(self) -> Generation:
        """The peer has everything this node wrote alone: its bitmap is clean."""
        return Generation(self.current, "", self.history)


class Verdict(enum.Enum):
    IN_SYNC = "in sync"  # same data generation; the source's bitmap covers any difference
    SOURCE_AHEAD = "source ahead"  # only the source wrote; its bitmap holds what differs
    MERGE = "merge"  # the copy was demoted after writing: both bitmaps are copied
    SPLIT_BRAIN = "split brain"
    UNRELATED = "unrelated"


def compare(source: Generation, copy: Generation, copy_prepared: bool) -> Verdict:
    """What reconnecting ``source`` to its ``copy`` may do."""
    if source.current == copy.current:
        return Verdict.IN_SYNC
    if source.bitmap and copy.current == source.bitmap and not copy.bitmap:
        return Verdict.SOURCE_AHEAD
    common = copy.bitmap and copy.bitmap in (source.bitmap, source.current, *source.history)
    if copy_prepared and common:
        return Verdict.MERGE
    if common or (source.bitmap and source.bitmap in (copy.current, *copy.history)):
        return Verdict.SPLIT_BRAIN
    return Verdict.UNRELATED


def _identifier() -> str:
    return secrets.token_hex(8)
