"""Carries out the plan's removals on LIO through rtslib-fb.

rtslib's deletes take an object down in the order LIO requires (a target's mapped LUNs,
ACLs, LUNs and portals before its TPG; a backstore's HBA after it). Building objects is
``configfs_actions.py``'s part. Each removal is idempotent: an object already gone is not
an error, so a plan interrupted by a crash can simply be run again. rtslib's constructors
have side effects (module loading, configfs mounts), so they stay behind ``LioKernel``,
which imports this module on its first removal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from functools import singledispatchmethod

import rtslib_fb
from rtslib_fb.utils import RTSLibError, RTSLibNotInCFSError

from applianced.errors import KernelError
from applianced.iscsi.kernel import configfs, plan

log = logging.getLogger(__name__)


class RtslibActions:
    """LIO's removals through rtslib. Made on the first removal of the process."""

    def __init__(self) -> None:
        try:
            self.fabric = rtslib_fb.FabricModule("iscsi")
        except (RTSLibError, OSError) as exc:
            raise KernelError(f"LIO is not available on this node: {exc}") from exc

    def apply(self, actions: Sequence[plan.Action]) -> None:
        # rtslib keeps an index of backstore names for the whole process and looks names up
        # only there: dropped here, it is rebuilt from configfs on first use, so that
        # backstores other tools made or removed since the last call are seen.
        rtslib_fb.tcm.bs_cache.clear()
        for action in actions:
            try:
                self._apply(action)
            except (RTSLibError, OSError) as exc:
                raise KernelError(f"LIO refused {plan.describe(action)}: {exc}") from exc
            if log.isEnabledFor(logging.DEBUG):
                log.debug("applied %s", plan.describe(action))

    @singledispatchmethod
    def _apply(self, action: plan.Action) -> None:
        raise TypeError(f"no rtslib handler for {action!r}")

    @_apply.register
    def _(self, action: plan.DeleteStorageObject) -> None:
        # Disk names are unique across kinds, so a name is looked up in both backends.
        for backstore in (rtslib_fb.FileIOStorageObject, rtslib_fb.BlockStorageObject):
            with contextlib.suppress(RTSLibNotInCFSError):
                backstore(action.name).delete()
                return

    @_apply.register
    def _(self, action: plan.DeleteTarget) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.Target(self.fabric, action.iqn, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.RemovePortal) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            # rtslib spells the address as configfs names the portal: IPv6 in brackets.
            address = configfs.portal_name(action.address, action.port).rpartition(":")[0]
            rtslib_fb.NetworkPortal(self._tpg(action.iqn), address, action.port, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.RemoveLun) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.LUN(self._tpg(action.iqn), lun=action.lun).delete()

    @_apply.register
    def _(self, action: plan.RemoveAcl) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            self._acl(action.iqn, action.initiator).delete()

    @_apply.register
    def _(self, action: plan.UnmapLun) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.MappedLUN(self._acl(action.iqn, action.initiator), action.mapped_lun).delete()

    def _tpg(self, iqn: str) -> rtslib_fb.TPG:
        target = rtslib_fb.Target(self.fabric, iqn, mode="lookup")
        return rtslib_fb.TPG(target, configfs.TPG_TAG, mode="lookup")

    def _acl(self, iqn: str, initiator: str) -> rtslib_fb.NodeACL:
        return rtslib_fb.NodeACL(self._tpg(iqn), initiator, mode="lookup")
