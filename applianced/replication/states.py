"""Mirror states, numbered as the reference reports them (GETVOLUMEDRVSTATE), and how the
kernel's view of a raid1 over the peer's copy maps onto them.

The kernel knows whether the peer's leg is alive and whether it is in sync; it does not know
whether the administrator paused or broke the mirror, so that intent is an input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from applianced.errors import KernelError


class MirrorState(enum.IntEnum):
    NONE = 0
    MIRRORING = 1
    RESYNCING = 2
    BROKEN = 3
    PAUSED = 4
    RESYNC_PENDING = 5


class Intent(enum.Enum):
    """What the administrator asked of a mirror."""

    MIRROR = "mirror"
    PAUSE = "pause"
    BREAK = "break"


# md's sync actions that copy blocks to a leg that is not in sync.
_COPYING = frozenset({"recover", "resync"})


@dataclass(frozen=True)
class RaidStatus:
    """One line of ``dmsetup status`` for a dm-raid raid1 target.

    ``health`` has one character per leg: ``A`` alive and in sync, ``a`` alive and not
    in sync, ``D`` dead. ``synced``/``total`` are sectors of the current sync pass.
    """

    health: str
    synced: int
    total: int
    action: str
    mismatches: int

    @classmethod
    def parse(cls, line: str) -> RaidStatus:
        # "0 131072 raid raid1 2 AA 131072/131072 idle 0 0 -"
        fields = line.split()
        try:
            if fields[2:4] != ["raid", "raid1"]:
                raise ValueError("not a raid1 target")
            legs = int(fields[4])
            health = fields[5]
            synced, total = (int(n) for n in fields[6].split("/"))
            action, mismatches = fields[7], int(fields[8])
            if len(health) != legs or set(health) - set("AaD"):
                raise ValueError(f"health {health!r} for {legs} legs")
        except (IndexError, ValueError) as exc:
            raise KernelError(f"unexpected raid status {line.strip()!r}: {exc}") from None
        return cls(health, synced, total, action, mismatches)

    @property
    def local_alive(self) -> bool:
        return self.health[0] != "D"

    @property
    def peer_dead(self) -> bool:
        return self.health[1] == "D"

    @property
    def copying(self) -> bool:
        return self.action in _COPYING and self.synced < self.total


def mirror_state(status: RaidStatus | None, intent: Intent) -> MirrorState:
    """The reference's state of a mirror whose raid (if assembled) reports ``status``."""
    if intent is Intent.BREAK:
        return MirrorState.BROKEN
    if intent is Intent.PAUSE:
        return MirrorState.PAUSED
    if status is None:
        return MirrorState.RESYNC_PENDING
    if status.peer_dead:
        # The bitmap goes on recording writes: a continue is a partial resync.
        return MirrorState.PAUSED
    if status.health[1] == "A" and not status.copying:
        return MirrorState.MIRRORING
    return MirrorState.RESYNCING if status.copying else MirrorState.RESYNC_PENDING
