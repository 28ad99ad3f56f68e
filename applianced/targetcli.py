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
from typing import Any

from applianced import names
from applianced.errors import InvalidArgument, NotSupported
from applianced.state import Acl, Chap, Config, Disk, Lun, Portal, Target

_BACKSTORE_RE = re.compile(r"^/backstores/(?P<plugin>[^/]+)/(?P<name>[^/]+)$")


def convert(data: Mapping[str, Any], iqn_prefix: str) -> Config:
    """The part of a node's configuration that ``data`` (a saveconfig.json) describes."""
    if not isinstance(data, Mapping) or ("targets" not in data and "storage_objects" not in data):
        raise InvalidArgument("this is not a targetcli saveconfig.json (no targets or storage_objects)")
    try:
        disks = _disks(data.get("storage_objects", []))
        targets = [_target(item, disks) for item in data.get("targets", []) if item.get("fabric") == "iscsi"]
        others = sorted({item.get("fabric", "?") for item in data.get("targets", [])} - {"iscsi"})
        if others:
            raise NotSupported(f"targets of fabric(s) {', '.join(others)} cannot be imported; only iSCSI")
        portals = {p for target, target_portals in targets for p in target_portals}
        discovery = _discovery_chap(data.get("fabric_modules", []))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"the targetcli configuration is malformed: {exc!r}") from None
    return Config(
        node_id="",
        iqn_prefix=iqn_prefix,
        disks={disk.name: disk for disk in disks.values()},
        targets=_named({target.iqn: target for target, _ in targets}),
        portals=tuple(sorted(portals, key=lambda p: (p.address, p.port))),
        discovery_chap=discovery,
    )


def _disks(items: list[Mapping[str, Any]]) -> dict[str, Disk]:
    unsupported = sorted(f"{item['plugin']}/{item['name']}" for item in items if item["plugin"] != "fileio")
    if unsupported:
        raise NotSupported(f"backstore(s) {', '.join(unsupported)} cannot be imported; only fileio for now")
    disks = {}
    for item in items:
        names.validate_object_name("disk", item["name"])
        serial = item.get("wwn") or str(uuid.uuid4())
        disks[item["name"]] = Disk(
            name=item["name"],
            path=item["dev"],
            size=int(item["size"]),
            serial=serial,
            description="imported from targetcli",
            write_back=bool(item.get("write_back", False)),
        )
    return disks


def _target(item: Mapping[str, Any], disks: Mapping[str, Disk]) -> tuple[Target, set[Portal]]:
    iqn = names.normalize_iscsi_name(item["wwn"], "target IQN")
    tpgs = item.get("tpgs", [])
    if len(tpgs) != 1:
        raise NotSupported(f"target {iqn} has {len(tpgs)} TPGs; applianced imports targets with exactly one")
    tpg = tpgs[0]
    attributes = tpg.get("attributes", {})
    if int(attributes.get("generate_node_acls", 0)):
        raise NotSupported(f"target {iqn} lets every initiator in (demo mode); add ACLs in targetcli first")
    read_only = set()
    acls = []
    for acl in tpg.get("node_acls", []):
        read_only |= {m["tpg_lun"] for m in acl.get("mapped_luns", []) if m.get("write_protect")}
        enforced = (
            int(attributes.get("authentication", 0)) or int(acl.get("attributes", {}).get("authentication", 0)) == 1
        )
        chap = None
        if enforced and acl.get("chap_password"):
            chap = Chap(
                user=acl.get("chap_userid", ""),
                secret=acl["chap_password"],
                mutual_user=acl.get("chap_mutual_userid", "") if acl.get("chap_mutual_password") else "",
                mutual_secret=acl.get("chap_mutual_password", ""),
            )
        acls.append(Acl(names.normalize_iscsi_name(acl["node_wwn"], "initiator name"), chap))
    luns = []
    for lun in tpg.get("luns", []):
        match = _BACKSTORE_RE.match(lun["storage_object"])
        if not match or match["name"] not in disks:
            raise InvalidArgument(f"LUN {lun['index']} of {iqn} refers to an unknown backstore {lun['storage_object']}")
        luns.append(Lun(int(lun["index"]), match["name"], read_only=int(lun["index"]) in read_only))
    alias = tpg.get("parameters", {}).get("TargetAlias", "")
    portals = {
        Portal(address=portal["ip_address"].strip("[]"), port=int(portal["port"])) for portal in tpg.get("portals", [])
    }
    target = Target(
        name="",
        iqn=iqn,
        description="imported from targetcli",
        alias="" if alias == "LIO Target" else alias,
        enabled=bool(tpg.get("enable", True)),
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


def _discovery_chap(modules: list[Mapping[str, Any]]) -> Chap | None:
    for module in modules:
        if module.get("name") == "iscsi" and module.get("discovery_enable_auth"):
            return Chap(
                user=module.get("discovery_userid", ""),
                secret=module.get("discovery_password", ""),
                mutual_user=module.get("discovery_mutual_userid", ""),
                mutual_secret=module.get("discovery_mutual_password", ""),
            )
    return None
