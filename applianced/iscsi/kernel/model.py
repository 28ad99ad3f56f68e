"""What LIO should hold, as plain values, and how a node's desired ``Config`` renders to it.

Reconciliation compares two ``KernelConfig`` values (what the kernel has, what it should
have), so the model holds exactly the settings that applianced owns and nothing it does not
manage (counters, sessions, attributes left at the kernel's default).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from applianced.state import Acl, Chap, Config, Disk, Target

# TPG attributes applianced pins on every target. ``authentication`` must be explicit
# (logins fail otherwise); generate_node_acls=0 makes the ACL list the only way in;
# demo_mode_discovery=0 hides the target from SendTargets discovery by initiators that
# are not in it (LIO's default lists every target to everyone); demo_mode_write_protect=1
# keeps a stray demo-mode login read-only.
TPG_ATTRIBUTES: Mapping[str, str] = {
    "authentication": "0",
    "generate_node_acls": "0",
    "demo_mode_discovery": "0",
    "demo_mode_write_protect": "1",
    "cache_dynamic_acls": "0",
}


# The login negotiation every target offers: what iSCSI boot firmware accepts (in-order
# data PDUs and sequences, MaxBurstLength >= FirstBurstLength), pinned so that a TPG adopted
# from another tool is brought back to it. DefaultTime2Wait is the pause an initiator makes
# after losing its connection before it logs in again; the larger offer wins (RFC 7143
# §13.15), so 0 here lets an initiator that offers 0 too come back at once after a failover
# (LIO's default, 2, would add two seconds to every takeover's stall).
NEGOTIATION_PROFILE: Mapping[str, str] = {
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "FirstBurstLength": "65536",
    "MaxBurstLength": "262144",
    "InitialR2T": "Yes",
    "ImmediateData": "Yes",
    "ErrorRecoveryLevel": "0",
    "DefaultTime2Wait": "0",
}
# How a target's digest setting is offered in the login negotiation (RFC 7143 §13.1).
DIGEST_OFFERS: Mapping[str, str] = {"allowed": "CRC32C,None", "required": "CRC32C", "off": "None"}
# TPG parameters applianced manages; others keep LIO's defaults.
TPG_PARAMETERS = ("TargetAlias", "HeaderDigest", "DataDigest", *NEGOTIATION_PROFILE)


@dataclass(frozen=True)
class StorageObject:
    """A backstore: ``fileio`` (a file, of a set size) or ``block`` (a device; size 0,
    since LIO follows the device's own size)."""

    name: str
    path: str
    size: int
    serial: str
    write_back: bool = False
    plugin: str = "fileio"


@dataclass(frozen=True)
class DiskDevice:
    """The device-mapper device that a "dm" disk's block backstore sits on.

    It maps ``lower``: the disk's file (through a loop device of its size), the disk's
    block device, or what replication puts there (a mirror of the disk). Changing
    ``lower`` reloads the device under a live backstore: initiators see a pause, never a
    LUN that goes away. ``size`` 0 follows a block device's own size.
    """

    name: str
    lower: str
    lower_is_file: bool
    size: int
    # Writes skip this node's page cache (direct I/O on the file), unless the disk is
    # write-back. The kernel may fall back to buffered I/O, so this is not compared.
    direct_io: bool = field(default=True, compare=False)

    @property
    def node(self) -> str:
        """The block-device node LIO's backstore opens."""
        return device_node(self.name)


# How each registration begins in the file where LIO saves a backstore's persistent
# reservations (APTPL); once the last one goes, LIO writes "No Registrations or Reservations".
REGISTRATION_START = "PR_REG_START:"


def holds_registrations(saved: str) -> bool:
    """Whether LIO's saved reservations of a backstore (the file's text) register anyone."""
    return REGISTRATION_START in saved


DISK_DEVICE_PREFIX = "applianced-disk-"
# The nodes of applianced's device-mapper devices (applianced/blockdev/dm.py).
DEVICE_NODE_DIR = "/run/applianced/block"


def disk_device_name(disk: str) -> str:
    return DISK_DEVICE_PREFIX + disk


def device_node(device: str) -> str:
    return f"{DEVICE_NODE_DIR}/{device}"


@dataclass(frozen=True)
class MappedLun:
    """A LUN as one initiator sees it."""

    mapped_lun: int
    tpg_lun: int
    write_protect: bool = False


@dataclass(frozen=True)
class NodeAcl:
    """An initiator allowed into a TPG, with the LUNs it sees and the CHAP it must pass."""

    initiator: str
    mapped_luns: frozenset[MappedLun] = frozenset()
    # Resolved credentials (user names filled in); None: no authentication for this ACL.
    auth: Chap | None = None


@dataclass(frozen=True)
class KernelTarget:
    """An iSCSI target with its single TPG (tag 1)."""

    iqn: str
    enabled: bool
    attributes: Mapping[str, str] = field(default_factory=dict)
    # iSCSI login parameters of the TPG (e.g. TargetAlias), as LIO spells them.
    parameters: Mapping[str, str] = field(default_factory=dict)
    portals: frozenset[tuple[str, int]] = frozenset()
    luns: Mapping[int, str] = field(default_factory=dict)
    acls: Mapping[str, NodeAcl] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelConfig:
    """The part of LIO's configuration that applianced manages."""

    storage_objects: Mapping[str, StorageObject] = field(default_factory=dict)
    targets: Mapping[str, KernelTarget] = field(default_factory=dict)
    # The iSCSI fabric's discovery authentication, global to the node.
    discovery_auth: Chap | None = None
    # The device-mapper devices of "dm" disks, by disk name.
    disk_devices: Mapping[str, DiskDevice] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    """One initiator logged in to a target (read from LIO, never configured).

    ``addresses`` are the initiator's ends of the session's connections, ``portals`` the
    portals those addresses are connected to (``10.0.0.1:3260``, ``[fd00::1]:3260``).
    """

    target_iqn: str
    initiator: str
    state: str
    addresses: tuple[str, ...]
    isid: str = ""
    tsih: int = 0
    portals: tuple[str, ...] = ()


@dataclass(frozen=True)
class Connection:
    """An established TCP connection from an initiator to one of the node's portals."""

    source_address: str
    source_port: int
    portal: str


@dataclass(frozen=True)
class TargetSessions:
    """What is logged in to one target.

    LIO names only the newest session of each initiator, so with multipath ``count`` (the
    kernel's own session count) can exceed ``len(sessions)``; ``connections`` lists every
    path on the target's portals.
    """

    sessions: tuple[Session, ...] = ()
    count: int = 0
    connections: tuple[Connection, ...] = ()


@dataclass(frozen=True)
class LoginCounters:
    """A target's login statistics as LIO keeps them (counting since the target was made).

    ``last_fail_name`` and ``last_fail_address`` describe the target's most recent failed
    login of any kind; they are empty when LIO has none (it has no name for a login it
    refused before reading the initiator's parameters, such as one outside the ACL).
    """

    accepts: int = 0
    authorize_fails: int = 0
    authenticate_fails: int = 0
    negotiate_fails: int = 0
    other_fails: int = 0
    last_fail_name: str = ""
    last_fail_address: str = ""


@dataclass(frozen=True)
class LogPosition:
    """Where reading the kernel log stopped: a record's sequence number within one boot."""

    boot_id: str
    seq: int


@dataclass(frozen=True)
class LoginActivity:
    """One reading of the login statistics and of the new iSCSI lines of the kernel log.

    The log is read before the counters, so every login a log line tells of is already
    counted. ``log_position`` is None when the kernel log cannot be read on this node.
    """

    boot_id: str
    counters: Mapping[str, LoginCounters]
    log: tuple[str, ...] = ()
    log_position: LogPosition | None = None


def render(
    config: Config,
    unserved: AbstractSet[str] = frozenset(),
    lowers: Mapping[str, str] | None = None,
    standby: Mapping[str, str] | None = None,
) -> KernelConfig:
    """Return the LIO configuration that realises ``config``.

    Disks named in ``unserved`` are not served now: their backing is missing (a file system
    that is not mounted, a drive that is gone), or they are the peer's locked mirror copy.
    They get no device and no backstore, and their LUNs are not exported, so that initiators
    never read zeros (or a copy being written) in place of their data; every other LUN is
    served. ``lowers`` names, for some "dm" disks, the device their device-mapper device
    maps instead of the disk itself: a mirror of it, which replication assembled.

    ``standby`` names, for some unserved copies, the device a takeover will serve them
    from (the copy's prepared array): such a disk's device, backstore and LUNs are made in
    advance in the *disabled* targets that hold it, so that a takeover only enables the
    targets (LIO reads the real device's block size and limits as it makes the backstore). In
    an enabled target its LUN stays out: nothing reaches a copy around its mirror.
    """
    lowers = lowers or {}
    standby = standby or {}
    waiting = {
        lun.disk
        for target in config.targets.values()
        if not target.enabled
        for lun in target.luns
        if lun.disk in standby and lun.disk in unserved and config.disks[lun.disk].backstore == "dm"
    }
    served = [disk for disk in config.disks.values() if disk.name not in unserved or disk.name in waiting]
    storage_objects = {disk.name: _storage_object(disk) for disk in served}
    disk_devices = {
        disk.name: _disk_device(disk, lowers.get(disk.name, standby.get(disk.name)))
        for disk in served
        if disk.backstore == "dm"
    }
    targets = {}
    for target in config.targets.values():
        luns = [lun for lun in target.luns if lun.disk not in unserved or (not target.enabled and lun.disk in waiting)]
        # Every allowed initiator sees every LUN of the target under the same number.
        mapped = frozenset(MappedLun(lun.number, lun.number, lun.read_only) for lun in luns)
        targets[target.iqn] = KernelTarget(
            iqn=target.iqn,
            enabled=target.enabled,
            attributes=dict(TPG_ATTRIBUTES),
            parameters={
                "TargetAlias": target.alias or target.name,
                "HeaderDigest": DIGEST_OFFERS[target.header_digest],
                "DataDigest": DIGEST_OFFERS[target.data_digest],
                **NEGOTIATION_PROFILE,
            },
            portals=frozenset((p.address, p.port) for p in config.portals if p.serves(target.name)),
            luns={lun.number: lun.disk for lun in luns},
            acls={
                acl.initiator: NodeAcl(acl.initiator, mapped, resolve_chap(acl.chap or target.chap, acl, target))
                for acl in target.acls
            },
        )
    return KernelConfig(
        storage_objects=storage_objects,
        targets=targets,
        discovery_auth=config.discovery_chap,
        disk_devices=disk_devices,
    )


def _storage_object(disk: Disk) -> StorageObject:
    if disk.backstore == "dm":
        # The block backstore follows its device's size, which grows with the disk.
        return StorageObject(disk.name, device_node(disk_device_name(disk.name)), 0, disk.serial, plugin="block")
    if disk.kind == "file":
        return StorageObject(disk.name, disk.path, disk.size, disk.serial, disk.write_back)
    return StorageObject(disk.name, disk.path, 0, disk.serial, plugin="block")


def _disk_device(disk: Disk, lower: str | None) -> DiskDevice:
    name = disk_device_name(disk.name)
    if lower is not None:
        return DiskDevice(name, lower, False, disk.size)
    if disk.kind == "file":
        return DiskDevice(name, disk.path, True, disk.size, direct_io=not disk.write_back)
    return DiskDevice(name, disk.path, False, 0)


def resolve_chap(chap: Chap | None, acl: Acl, target: Target) -> Chap | None:
    """Fill in the default user names: the initiator's IQN, and the target's for mutual CHAP."""
    if chap is None:
        return None
    return Chap(
        user=chap.user or acl.initiator,
        secret=chap.secret,
        mutual_user=(chap.mutual_user or target.iqn) if chap.mutual else "",
        mutual_secret=chap.mutual_secret,
    )
