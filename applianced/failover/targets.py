"""The protected targets' definitions on their way to the passive node, and on arrival.

The active node sends each protected target whole (IQN, LUN numbers, flags, ACLs, CHAP,
digests, allow-list), so that the passive node serves it with the same identity after a
takeover; the disks' identity (serial, hence VPD 0x80 and the NAA id of 0x83) is the
copies' already. CHAP secrets travel encrypted. On arrival the LUNs are moved onto the
local copies of the active node's disks and the target is kept disabled until a takeover.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from applianced.errors import NotFound
from applianced.failover.messages import PreparedTarget, SealedChap
from applianced.peer import secrets
from applianced.state import Chap, Target


def outgoing(target: Target, pair_key: bytes) -> PreparedTarget:
    """``target`` with its CHAP secrets taken out and sealed."""
    sealed = []

    def blank(initiator: str, chap: Chap | None) -> Chap | None:
        if chap is None:
            return None
        sealed.append(
            SealedChap(
                initiator,
                secrets.seal(pair_key, chap.secret) if chap.secret else b"",
                secrets.seal(pair_key, chap.mutual_secret) if chap.mutual_secret else b"",
            )
        )
        return dataclasses.replace(chap, secret="", mutual_secret="")

    acls = tuple(dataclasses.replace(acl, chap=blank(acl.initiator, acl.chap)) for acl in target.acls)
    bare = dataclasses.replace(target, chap=blank("", target.chap), acls=acls)
    return PreparedTarget(bare, tuple(sealed))


def incoming(prepared: PreparedTarget, pair_key: bytes, copies: Mapping[str, str]) -> Target:
    """The target to keep here: secrets restored, LUNs on the copies (``copies``: the peer's
    disk name to this node's), disabled. NotFound for a LUN whose disk has no copy here."""
    found = {chap.initiator: chap for chap in prepared.secrets}

    def restore(initiator: str, chap: Chap | None) -> Chap | None:
        if chap is None:
            return None
        sealed = found.get(initiator, SealedChap(initiator))
        return dataclasses.replace(
            chap,
            secret=secrets.unseal(pair_key, sealed.secret) if sealed.secret else "",
            mutual_secret=secrets.unseal(pair_key, sealed.mutual_secret) if sealed.mutual_secret else "",
        )

    target = prepared.target
    luns = []
    for lun in target.luns:
        if lun.disk not in copies:
            raise NotFound(f"disk {lun.disk!r} of LUN {lun.number} of {target.name!r} has no copy on this node")
        luns.append(dataclasses.replace(lun, disk=copies[lun.disk]))
    acls = tuple(dataclasses.replace(acl, chap=restore(acl.initiator, acl.chap)) for acl in target.acls)
    return dataclasses.replace(target, enabled=False, luns=tuple(luns), acls=acls, chap=restore("", target.chap))
