"""Migration from targetcli: turn a saveconfig.json into applianced's configuration.

targetcli (and targetctl) save LIO's configuration as rtslib's dump. applianced takes the
iSCSI targets with their single TPG, fileio backstores, LUNs, node ACLs with their CHAP
credentials, portals and discovery CHAP. What it cannot represent faithfully (other
backstores or fabrics, several TPGs, demo mode that lets every initiator in) is refused
by name, so that a migration never silently drops access rules.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from applianced import decoding, names
from applianced.errors import InvalidArgument, NotSupported
from applianced.state import Acl, Chap, Config, Disk, Lun, Portal, Target

_BACKSTORE_RE = re.compile(r"/backstores/(?P<plugin>[^/]+)/(?P<name>[^/]+)")

# rtslib's dump as far as applianced reads it; other keys are ignored. Attribute values are
# numbers in the files rtslib writes and strings in some older ones, so both are taken.
Attributes = dict[str, int | str]


@dataclass(frozen=True)
class StorageObject:
    plugin: str
    name: str
    dev: str = ""
    size: int = 0
    wwn: str = ""
    write_back: bool = False


@dataclass(frozen=True)
class MappedLun:
    tpg_lun: int
    write_protect: bool = False


@dataclass(frozen=True)
class NodeAcl:
    node_wwn: str
    attributes: Attributes = field(default_factory=dict)
    mapped_luns: tuple[MappedLun, ...] = ()
    chap_userid: str = ""
    chap_password: str = ""
    chap_mutual_userid: str = ""
    chap_mutual_password: str = ""


@dataclass(frozen=True)
class TpgLun:
    index: int
    storage_object: str


@dataclass(frozen=True)
class TpgPortal:
    ip_address: str
    port: int


@dataclass(frozen=True)
class Tpg:
    enable: bool | int = True
    attributes: Attributes = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    node_acls: tuple[NodeAcl, ...] = ()
    luns: tuple[TpgLun, ...] = ()
    portals: tuple[TpgPortal, ...] = ()


@dataclass(frozen=True)
class SavedTarget:
    fabric: str = "?"
    wwn: str = ""
    tpgs: tuple[Tpg, ...] = ()


@dataclass(frozen=True)
class FabricModule:
    name: str = ""
    discovery_enable_auth: bool | int = False
    discovery_userid: str = ""
    discovery_password: str = ""
    discovery_mutual_userid: str = ""
    discovery_mutual_password: str = ""


@dataclass(frozen=True)
class SaveConfig:
    storage_objects: tuple[StorageObject, ...] | None = None
    targets: tuple[SavedTarget, ...] | None = None
    fabric_modules: tuple[FabricModule, ...] = ()


def convert(document: str | bytes, iqn_prefix: str) -> Config:
    """The part of a node's configuration that ``document`` (a saveconfig.json) describes."""
    data = decoding.decode(document, SaveConfig, "the targetcli configuration")
    if data.targets is None and data.storage_objects is None:
        raise InvalidArgument("this is not a targetcli saveconfig.json (no targets or storage_objects)")
    disks = _disks(data.storage_objects or ())
    others = sorted({item.fabric for item in data.targets or ()} - {"iscsi"})
    if others:
        raise NotSupported(f"targets of fabric(s) {', '.join(others)} cannot be imported; only iSCSI")
    targets = [_target(item, disks) for item in data.targets or ()]
    portals = {p for target, target_portals in targets for p in target_portals}
    return Config(
        node_id="",
        iqn_prefix=iqn_prefix,
        disks={disk.name: disk for disk in disks.values()},
        targets=_named({target.iqn: target for target, _ in targets}),
        portals=tuple(sorted(portals, key=lambda p: (p.address, p.port))),
        discovery_chap=_discovery_chap(data.fabric_modules),
    )


def _disks(items: tuple[StorageObject, ...]) -> dict[str, Disk]:
    unsupported = sorted(f"{item.plugin}/{item.name}" for item in items if item.plugin != "fileio")
    if unsupported:
        raise NotSupported(f"backstore(s) {', '.join(unsupported)} cannot be imported; only fileio for now")
    disks: dict[str, Disk] = {}
    for item in items:
        names.validate_object_name("disk", item.name)
        if item.name in disks:
            raise InvalidArgument(f"the targetcli configuration lists backstore {item.name!r} twice")
        disks[item.name] = Disk(
            name=item.name,
            path=item.dev,
            size=item.size,
            serial=item.wwn or str(uuid.uuid4()),
            description="imported from targetcli",
            write_back=item.write_back,
        )
    return disks


def _flag(attributes: Attributes, key: str) -> bool:
    value = attributes.get(key, 0)
    if isinstance(value, str) and value not in ("0", "1"):
        raise InvalidArgument(f"the targetcli configuration has attribute {key} = {value!r}, not 0 or 1")
    return int(value) == 1


def _target(item: SavedTarget, disks: Mapping[str, Disk]) -> tuple[Target, set[Portal]]:
    iqn = names.normalize_iscsi_name(item.wwn, "target IQN")
    if len(item.tpgs) != 1:
        raise NotSupported(f"target {iqn} has {len(item.tpgs)} TPGs; applianced imports targets with exactly one")
    (tpg,) = item.tpgs
    if _flag(tpg.attributes, "generate_node_acls"):
        raise NotSupported(f"target {iqn} lets every initiator in (demo mode); add ACLs in targetcli first")
    read_only = set()
    acls = []
    for acl in tpg.node_acls:
        read_only |= {m.tpg_lun for m in acl.mapped_luns if m.write_protect}
        enforced = _flag(tpg.attributes, "authentication") or _flag(acl.attributes, "authentication")
        chap = None
        if enforced and acl.chap_password:
            chap = Chap(
                user=acl.chap_userid,
                secret=acl.chap_password,
                mutual_user=acl.chap_mutual_userid if acl.chap_mutual_password else "",
                mutual_secret=acl.chap_mutual_password,
            )
        acls.append(Acl(names.normalize_iscsi_name(acl.node_wwn, "initiator name"), chap))
    luns = []
    for lun in tpg.luns:
        match = _BACKSTORE_RE.fullmatch(lun.storage_object)
        if not match or match["name"] not in disks:
            raise InvalidArgument(f"LUN {lun.index} of {iqn} refers to an unknown backstore {lun.storage_object!r}")
        luns.append(Lun(lun.index, match["name"], read_only=lun.index in read_only))
    alias = tpg.parameters.get("TargetAlias", "")
    portals = {Portal(address=portal.ip_address.strip("[]"), port=portal.port) for portal in tpg.portals}
    target = Target(
        name="",
        iqn=iqn,
        description="imported from targetcli",
        alias="" if alias == "LIO Target" else alias,
        enabled=bool(tpg.enable),
        luns=tuple(sorted(luns, key=lambda lun: lun.number)),
        acls=tuple(acls),
    )
    return target, portals


def _named(targets: Mapping[str, Target]) -> dict[str, Target]:
    """Name each target after the unique part of its IQN, made unique and valid."""
    named: dict[str, Target] = {}
    for iqn, target in sorted(targets.items()):
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", iqn.split(":")[-1] if ":" in iqn else iqn).strip("-.")[:56] or "target"
        name, count = base, 1
        while name in named:
            count += 1
            name = f"{base}-{count}"
        named[name] = Target(**{**vars(target), "name": name})
    return named


def _discovery_chap(modules: tuple[FabricModule, ...]) -> Chap | None:
    for module in modules:
        if module.name == "iscsi" and module.discovery_enable_auth:
            return Chap(
                user=module.discovery_userid,
                secret=module.discovery_password,
                mutual_user=module.discovery_mutual_userid,
                mutual_secret=module.discovery_mutual_password,
            )
    return None
