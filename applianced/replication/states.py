"""Mirror states, numbered as the reference reports them (GETVOLUMEDRVSTATE), and how the
kernel's view of the raid1 over the peer's copy maps onto them.

The kernel knows whether the peer's leg is in the array, failed, being copied or in sync;
it does not know whether the administrator paused or broke the mirror, nor whether a
resync was asked for and waits for the peer: those are inputs.
"""

from __future__ import annotations

import enum

from applianced.blockdev.md import ArrayStatus


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


def mirror_state(status: ArrayStatus | None, intent: Intent, pending: bool = False) -> MirrorState:
    """The reference's state of a source's mirror whose array (if assembled) reports
    ``status``; ``pending``: a resync was asked for (create, continue, resync) and the
    peer's leg is not back yet."""
    if intent is Intent.BREAK:
        return MirrorState.BROKEN
    if intent is Intent.PAUSE:
        return MirrorState.PAUSED
    peer = next((leg for leg in status.legs if leg.name.startswith("nbd")), None) if status else None
    if peer is None or peer.faulty:
        # The bitmap goes on recording writes: the resync that follows is partial.
        return MirrorState.RESYNC_PENDING if pending else MirrorState.PAUSED
    if status is not None and status.copying:
        return MirrorState.RESYNCING
    return MirrorState.MIRRORING if peer.in_sync else MirrorState.RESYNC_PENDING
