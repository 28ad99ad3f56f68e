"""The ordered list of LIO changes that turns one ``KernelConfig`` into another.

Removals run first and top-down (portals, mappings, ACLs, LUNs, targets, backstores), then
additions bottom-up, and a new target is enabled last so that no initiator ever sees it
half built. Every action is idempotent in the backend, so a plan can be replayed after a
crash. An empty plan means the kernel already matches: a daemon restart then touches nothing
and logged-in sessions never notice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from applianced.iscsi.kernel.model import DiskDevice, KernelConfig, KernelTarget, MappedLun, StorageObject
from applianced.state import Chap


@dataclass(frozen=True)
class CreateDiskDevice:
    """Map a "dm" disk's device (and the loop device of its file)."""

    device: DiskDevice


@dataclass(frozen=True)
class ReloadDiskDevice:
    """Re-point or grow a live disk device: its I/O pauses while the table is swapped."""

    device: DiskDevice


@dataclass(frozen=True)
class RemoveDiskDevice:
    """Remove a disk device once no backstore uses it (its file's loop device goes too)."""

    name: str


@dataclass(frozen=True)
class CreateStorageObject:
    storage_object: StorageObject


@dataclass(frozen=True)
class GrowStorageObject:
    """Make a live backstore larger; initiators see the new capacity when they rescan."""

    name: str
    size: int


@dataclass(frozen=True)
class DeleteStorageObject:
    name: str


@dataclass(frozen=True)
class CreateTarget:
    """Create the target and its TPG 1, disabled."""

    iqn: str


@dataclass(frozen=True)
class DeleteTarget:
    """Delete the target with everything below it."""

    iqn: str


@dataclass(frozen=True)
class SetTpgAttributes:
    iqn: str
    attributes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SetTpgParameters:
    iqn: str
    parameters: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SetTpgEnabled:
    iqn: str
    enabled: bool


@dataclass(frozen=True)
class AddPortal:
    iqn: str
    address: str
    port: int


@dataclass(frozen=True)
class RemovePortal:
    iqn: str
    address: str
    port: int


@dataclass(frozen=True)
class AddLun:
    iqn: str
    lun: int
    storage_object: str


@dataclass(frozen=True)
class RemoveLun:
    iqn: str
    lun: int


@dataclass(frozen=True)
class AddAcl:
    iqn: str
    initiator: str


@dataclass(frozen=True)
class RemoveAcl:
    iqn: str
    initiator: str


@dataclass(frozen=True)
class SetAclAuth:
    """Require ``auth`` (CHAP) from an initiator, or no authentication when None."""

    iqn: str
    initiator: str
    auth: Chap | None


@dataclass(frozen=True)
class SetDiscoveryAuth:
    auth: Chap | None


@dataclass(frozen=True)
class MapLun:
    iqn: str
    initiator: str
    mapped_lun: MappedLun


@dataclass(frozen=True)
class UnmapLun:
    iqn: str
    initiator: str
    mapped_lun: int


Action = (
    CreateDiskDevice
    | ReloadDiskDevice
    | RemoveDiskDevice
    | CreateStorageObject
    | GrowStorageObject
    | DeleteStorageObject
    | CreateTarget
    | DeleteTarget
    | SetTpgAttributes
    | SetTpgParameters
    | SetTpgEnabled
    | AddPortal
    | RemovePortal
    | AddLun
    | RemoveLun
    | AddAcl
    | RemoveAcl
    | SetAclAuth
    | SetDiscoveryAuth
    | MapLun
    | UnmapLun
)


# What rtslib-fb carries out (rtslib_actions.py); disk_devices.py maps the disk devices,
# configfs_actions.py does the rest.
REMOVALS = (DeleteStorageObject, DeleteTarget, RemovePortal, RemoveLun, RemoveAcl, UnmapLun)
DISK_DEVICE_ACTIONS = (CreateDiskDevice, ReloadDiskDevice, RemoveDiskDevice)


def describe(action: Action) -> str:
    """The action in words, safe to log and to send to a caller: repr() of these dataclasses
    leaves out CHAP secrets (field(repr=False))."""
    return repr(action)


def plan(current: KernelConfig, desired: KernelConfig) -> list[Action]:
    """Return the actions that make ``current`` equal to ``desired``."""
    grown = {
        name: desired.storage_objects[name].size
        for name, obj in current.storage_objects.items()
        if name in desired.storage_objects and _only_grown(obj, desired.storage_objects[name])
    }
    replaced_objects = {
        name
        for name, obj in current.storage_objects.items()
        if name in desired.storage_objects and desired.storage_objects[name] != obj and name not in grown
    }
    removals: list[Action] = []
    additions: list[Action] = []
    for iqn, have in current.targets.items():
        want = desired.targets.get(iqn)
        if want is None:
            removals.append(DeleteTarget(iqn))
        else:
            _plan_target_changes(have, want, replaced_objects, removals, additions)
    for name in current.storage_objects:
        if name not in desired.storage_objects or name in replaced_objects:
            removals.append(DeleteStorageObject(name))
    # A disk device goes after its backstore, and comes (or changes) before one is made on it.
    removals += [
        RemoveDiskDevice(device.name)
        for name, device in current.disk_devices.items()
        if name not in desired.disk_devices
    ]
    backstores: list[Action] = []
    for name, device in desired.disk_devices.items():
        have = current.disk_devices.get(name)
        if have is None:
            backstores.append(CreateDiskDevice(device))
        elif have != device:
            backstores.append(ReloadDiskDevice(device))
    backstores += [GrowStorageObject(name, size) for name, size in sorted(grown.items())]
    backstores += [
        CreateStorageObject(obj)
        for name, obj in desired.storage_objects.items()
        if name not in current.storage_objects or name in replaced_objects
    ]
    for iqn, want in desired.targets.items():
        if iqn not in current.targets:
            additions.append(CreateTarget(iqn))
            _plan_target_changes(KernelTarget(iqn=iqn, enabled=False), want, set(), removals, additions)
    if current.discovery_auth != desired.discovery_auth:
        additions.append(SetDiscoveryAuth(desired.discovery_auth))
    return removals + backstores + additions


def _plan_target_changes(
    have: KernelTarget,
    want: KernelTarget,
    replaced_objects: set[str],
    removals: list[Action],
    additions: list[Action],
) -> None:
    iqn = have.iqn
    if have.enabled and not want.enabled:
        removals.append(SetTpgEnabled(iqn, False))
    removals.extend(RemovePortal(iqn, *portal) for portal in sorted(have.portals - want.portals))

    # A LUN whose backstore is replaced must be removed and added again, and so must every
    # mapping that points at it.
    stale_luns = {lun for lun, name in have.luns.items() if want.luns.get(lun) != name or name in replaced_objects}
    for initiator, acl in have.acls.items():
        wanted_acl = want.acls.get(initiator)
        if wanted_acl is None:
            removals.append(RemoveAcl(iqn, initiator))
            continue
        for mapped in sorted(acl.mapped_luns, key=_mapped_order):
            if mapped not in wanted_acl.mapped_luns or mapped.tpg_lun in stale_luns:
                removals.append(UnmapLun(iqn, initiator, mapped.mapped_lun))
    removals.extend(RemoveLun(iqn, lun) for lun in sorted(stale_luns))

    if dict(have.attributes) != dict(want.attributes):
        additions.append(SetTpgAttributes(iqn, tuple(sorted(want.attributes.items()))))
    if dict(have.parameters) != dict(want.parameters):
        additions.append(SetTpgParameters(iqn, tuple(sorted(want.parameters.items()))))
    additions.extend(
        AddLun(iqn, lun, name) for lun, name in sorted(want.luns.items()) if lun not in have.luns or lun in stale_luns
    )
    for initiator, wanted_acl in want.acls.items():
        acl = have.acls.get(initiator)
        if acl is None:
            additions.append(AddAcl(iqn, initiator))
            kept: frozenset[MappedLun] = frozenset()
        else:
            kept = frozenset(m for m in acl.mapped_luns if m.tpg_lun not in stale_luns)
        # Credentials before LUNs: an initiator must never see a LUN without passing CHAP.
        if (acl.auth if acl else None) != wanted_acl.auth:
            additions.append(SetAclAuth(iqn, initiator, wanted_acl.auth))
        additions.extend(
            MapLun(iqn, initiator, mapped) for mapped in sorted(wanted_acl.mapped_luns - kept, key=_mapped_order)
        )
    additions.extend(AddPortal(iqn, *portal) for portal in sorted(want.portals - have.portals))
    if want.enabled and not have.enabled:
        additions.append(SetTpgEnabled(iqn, True))


def _only_grown(have: StorageObject, want: StorageObject) -> bool:
    # Growing is done in place; any other change of a backstore means replacing it.
    return want.size > have.size and dataclasses.replace(have, size=want.size) == want


def _mapped_order(mapped: MappedLun) -> int:
    return mapped.mapped_lun
