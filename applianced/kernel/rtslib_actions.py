"""Carries out plan actions on LIO through rtslib-fb, one by one.

Each action is idempotent: it looks at what LIO holds before it changes anything, so a
plan interrupted by a crash can simply be run again. rtslib's constructors have side
effects (module loading, configfs mounts), so they stay behind ``LioKernel``, which imports
this module on its first change.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from functools import singledispatchmethod

import rtslib_fb
from rtslib_fb.utils import RTSLibError, RTSLibNotInCFSError, fwrite

from applianced.errors import KernelError
from applianced.kernel import configfs, plan
from applianced.state import Chap

log = logging.getLogger(__name__)


class _Found:
    """The rtslib objects that one ``apply()`` call looked up or made, by name.

    A lookup through rtslib costs milliseconds under emulation, and a target's actions
    would otherwise look up its TPG, ACL and backstore again and again. The objects are
    valid only within the call: between calls, other tools may change LIO.
    """

    def __init__(self, fabric: rtslib_fb.FabricModule) -> None:
        self.fabric = fabric
        # rtslib keeps an index of backstore names for the whole process and looks names up
        # only there: dropped here, it is rebuilt from configfs on first use, so that
        # backstores other tools made or removed since the last call are seen.
        rtslib_fb.tcm.bs_cache.clear()
        self.tpgs: dict[str, rtslib_fb.TPG] = {}
        self.acls: dict[tuple[str, str], rtslib_fb.NodeACL] = {}
        self.storage_objects: dict[str, rtslib_fb.StorageObject] = {}

    def tpg(self, iqn: str) -> rtslib_fb.TPG:
        tpg = self.tpgs.get(iqn)
        if tpg is None:
            try:
                target = rtslib_fb.Target(self.fabric, iqn, mode="lookup")
                tpg = self.tpgs[iqn] = rtslib_fb.TPG(target, configfs.TPG_TAG, mode="lookup")
            except RTSLibNotInCFSError:
                raise RTSLibError(f"target {iqn} does not exist") from None
        return tpg

    def acl(self, iqn: str, initiator: str) -> rtslib_fb.NodeACL:
        acl = self.acls.get((iqn, initiator))
        if acl is None:
            acl = self.acls[(iqn, initiator)] = rtslib_fb.NodeACL(self.tpg(iqn), initiator, mode="lookup")
        return acl

    def forget_target(self, iqn: str) -> None:
        self.tpgs.pop(iqn, None)
        for key in [key for key in self.acls if key[0] == iqn]:
            del self.acls[key]


class RtslibActions:
    """LIO's changes through rtslib. Made on the first change of the process."""

    def __init__(self) -> None:
        try:
            # rtslib's root sets LIO's database directory (/etc/target), which LIO accepts
            # only before the first backstore is registered.
            rtslib_fb.RTSRoot()
            self.fabric = rtslib_fb.FabricModule("iscsi")
        except (RTSLibError, OSError) as exc:
            raise KernelError(f"LIO is not available on this node: {exc}") from exc

    def apply(self, actions: Sequence[plan.Action]) -> None:
        found = _Found(self.fabric)
        for action in actions:
            try:
                self._apply(action, found)
            except (RTSLibError, OSError) as exc:
                raise KernelError(f"LIO refused {_describe(action)}: {exc}") from exc
            if log.isEnabledFor(logging.DEBUG):
                log.debug("applied %s", _describe(action))

    @singledispatchmethod
    def _apply(self, action: plan.Action, found: _Found) -> None:
        raise TypeError(f"no handler for {action!r}")

    @_apply.register
    def _(self, action: plan.CreateStorageObject, found: _Found) -> None:
        want = action.storage_object
        # Cheap when the backstore is missing: rtslib looks the name up in its index.
        so = _lookup_storage_object(want.name)
        if so is not None:
            plugin = "block" if isinstance(so, rtslib_fb.BlockStorageObject) else "fileio"
            if configfs.storage_object(want.name, plugin, so.path) == want:
                found.storage_objects[want.name] = so
                return
            raise RTSLibError(f"backstore {want.name} exists with other settings")
        if want.plugin == "block":
            so = rtslib_fb.BlockStorageObject(want.name, dev=want.path, wwn=want.serial)
        else:
            so = rtslib_fb.FileIOStorageObject(
                want.name, dev=want.path, size=want.size, wwn=want.serial, write_back=want.write_back
            )
        found.storage_objects[want.name] = so

    @_apply.register
    def _(self, action: plan.GrowStorageObject, found: _Found) -> None:
        so = rtslib_fb.FileIOStorageObject(action.name)
        if so.size < action.size:
            # fileio reads its size from fd_dev_size on every READ CAPACITY, and the control
            # file accepts a new value on a live device.
            fwrite(f"{so.path}/control", f"fd_dev_size={action.size}")

    @_apply.register
    def _(self, action: plan.DeleteStorageObject, found: _Found) -> None:
        found.storage_objects.pop(action.name, None)
        so = _lookup_storage_object(action.name)
        if so is not None:
            so.delete()

    @_apply.register
    def _(self, action: plan.CreateTarget, found: _Found) -> None:
        target = rtslib_fb.Target(self.fabric, action.iqn, mode="any")
        found.tpgs[action.iqn] = rtslib_fb.TPG(target, configfs.TPG_TAG, mode="any")

    @_apply.register
    def _(self, action: plan.DeleteTarget, found: _Found) -> None:
        found.forget_target(action.iqn)
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.Target(self.fabric, action.iqn, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.SetTpgAttributes, found: _Found) -> None:
        tpg = found.tpg(action.iqn)
        _write_changed(tpg.path, "attrib", action.attributes, tpg.set_attribute)

    @_apply.register
    def _(self, action: plan.SetTpgParameters, found: _Found) -> None:
        tpg = found.tpg(action.iqn)
        _write_changed(tpg.path, "param", action.parameters, tpg.set_parameter)

    @_apply.register
    def _(self, action: plan.SetTpgEnabled, found: _Found) -> None:
        found.tpg(action.iqn).enable = action.enabled

    @_apply.register
    def _(self, action: plan.AddPortal, found: _Found) -> None:
        rtslib_fb.NetworkPortal(found.tpg(action.iqn), _bracket(action.address), action.port, mode="any")

    @_apply.register
    def _(self, action: plan.RemovePortal, found: _Found) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.NetworkPortal(
                found.tpg(action.iqn), _bracket(action.address), action.port, mode="lookup"
            ).delete()

    @_apply.register
    def _(self, action: plan.AddLun, found: _Found) -> None:
        tpg = found.tpg(action.iqn)
        path = f"{tpg.path}/lun/lun_{action.lun}"
        if os.path.isdir(path):
            existing = configfs.lun(path)
            if existing == action.storage_object:
                return
            raise RTSLibError(f"LUN {action.lun} exists with backstore {existing or '(none)'}")
        so = found.storage_objects.get(action.storage_object) or _lookup_storage_object(action.storage_object)
        if so is None:
            raise RTSLibError(f"backstore {action.storage_object} does not exist")
        rtslib_fb.LUN(tpg, lun=action.lun, storage_object=so)

    @_apply.register
    def _(self, action: plan.RemoveLun, found: _Found) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.LUN(found.tpg(action.iqn), lun=action.lun).delete()

    @_apply.register
    def _(self, action: plan.AddAcl, found: _Found) -> None:
        acl = rtslib_fb.NodeACL(found.tpg(action.iqn), action.initiator, mode="any")
        found.acls[(action.iqn, action.initiator)] = acl

    @_apply.register
    def _(self, action: plan.RemoveAcl, found: _Found) -> None:
        found.acls.pop((action.iqn, action.initiator), None)
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.NodeACL(found.tpg(action.iqn), action.initiator, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.SetAclAuth, found: _Found) -> None:
        acl = found.acl(action.iqn, action.initiator)
        auth = action.auth or Chap()
        acl.chap_userid = auth.user
        acl.chap_password = auth.secret
        acl.chap_mutual_userid = auth.mutual_user
        acl.chap_mutual_password = auth.mutual_secret
        # Per-ACL enforcement (Linux ≥ 5.19): the TPG-wide switch would also force CHAP on
        # the target's other initiators.
        acl.set_attribute("authentication", "1" if action.auth else "0")

    @_apply.register
    def _(self, action: plan.SetDiscoveryAuth, found: _Found) -> None:
        fabric = self.fabric
        auth = action.auth or Chap()
        fabric.discovery_userid = auth.user
        fabric.discovery_password = auth.secret
        fabric.discovery_mutual_userid = auth.mutual_user
        fabric.discovery_mutual_password = auth.mutual_secret
        fabric.discovery_enable_auth = action.auth is not None

    @_apply.register
    def _(self, action: plan.MapLun, found: _Found) -> None:
        acl = found.acl(action.iqn, action.initiator)
        want = action.mapped_lun
        if os.path.isdir(f"{acl.path}/lun_{want.mapped_lun}"):
            if configfs.mapped_lun(acl.path, want.mapped_lun) == want:
                return
            raise RTSLibError(f"mapped LUN {want.mapped_lun} exists with other settings")
        rtslib_fb.MappedLUN(acl, want.mapped_lun, want.tpg_lun, want.write_protect)

    @_apply.register
    def _(self, action: plan.UnmapLun, found: _Found) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.MappedLUN(found.acl(action.iqn, action.initiator), action.mapped_lun).delete()


def _write_changed(
    tpg_path: str, kind: str, values: tuple[tuple[str, str], ...], write: Callable[[str, str], None]
) -> None:
    """Write only the TPG values that differ: a new TPG already has most of them, and a
    read costs far less than a write through rtslib."""
    have = configfs.tpg_values(tpg_path, kind, (name for name, _ in values))
    for name, value in values:
        if have[name] != value:
            write(name, value)


def _lookup_storage_object(name: str) -> rtslib_fb.StorageObject | None:
    # Disk names are unique across kinds, so a name is looked up in both backends.
    for backstore in (rtslib_fb.FileIOStorageObject, rtslib_fb.BlockStorageObject):
        try:
            return backstore(name)
        except RTSLibNotInCFSError:
            continue
    return None


def _bracket(address: str) -> str:
    # rtslib wants IPv6 portal addresses in brackets, as configfs names them.
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


def _describe(action: plan.Action) -> str:
    # repr() of a dataclass leaves out CHAP secrets (field(repr=False)), so the description
    # is safe to log and to send to the caller.
    return repr(action)
