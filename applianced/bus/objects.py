"""The exported D-Bus objects: the manager at the root and one object per entity.

Handlers only unpack arguments, call the engine and return object paths; validation and
every decision live in the engine. Entity objects hold the current value of their entity
and are kept in step with the configuration by ``ObjectTree``.
"""

import dataclasses
import inspect
import json
from collections.abc import Iterator
from typing import Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from applianced import __version__
from applianced.bus import paths
from applianced.bus.errors import translate_errors
from applianced.bus.failover import FailoverInterface
from applianced.bus.mirror import MirrorObjects
from applianced.bus.options import Options
from applianced.bus.peer import PeerInterface
from applianced.constants import (
    ACL_INTERFACE,
    BOOT_PROFILE_INTERFACE,
    DISK_INTERFACE,
    FAILOVER_PATH,
    LUN_INTERFACE,
    MANAGER_INTERFACE,
    PEER_DEFAULT_PORT,
    PEER_PATH,
    PORTAL_INTERFACE,
    ROOT_PATH,
    TARGET_INTERFACE,
)
from applianced.engine import Appliance
from applianced.errors import InvalidArgument
from applianced.failover.service import Failover
from applianced.iscsi import bootprofile
from applianced.peer.service import Peer
from applianced.replication.service import Replication
from applianced.state import Acl, BootClient, Chap, Config, Disk, Lun, Portal, Target

READ = PropertyAccess.READ


CHAP_KEYS = {"user": "s", "secret": "s", "mutual_user": "s", "mutual_secret": "s"}


def chap_from(method: str, credentials: dict[str, Variant]) -> Chap | None:
    """Credentials from an ``a{sv}``; an empty dictionary turns CHAP off."""
    values = Options(method, credentials, CHAP_KEYS).values()
    return Chap(**values) if values else None


def _acl_chap(target: Target, initiator: str) -> Chap | None:
    acl = target.acl(initiator)
    return (acl.chap if acl else None) or target.chap


def describe_chap(chap: Chap | None) -> str:
    if chap is None:
        return "none"
    return "mutual-chap" if chap.mutual else "chap"


class EntityInterface(ServiceInterface):
    """The object of one entity; ``value`` is the entity as the engine last committed it."""

    INTERFACE: str

    def __init__(self, engine: Appliance, value: Any) -> None:
        super().__init__(self.INTERFACE)
        self.engine = engine
        self.value = value

    def refresh(self, value: Any) -> None:
        """Take the entity's new value and announce the properties that changed."""
        before = self._property_values()
        self.value = value
        changed = {name: v for name, v in self._property_values().items() if before.get(name) != v}
        if changed:
            self.emit_properties_changed(changed)

    def _property_values(self) -> dict[str, Any]:
        values = {}
        for prop in self.introspect().properties:
            value = getattr(self, prop.name)
            if inspect.isawaitable(value):
                # Live properties (read from the kernel on demand) are never cached.
                value.close()
                continue
            values[prop.name] = value
        return values


class ManagerInterface(EntityInterface):
    """Creates entities and describes the node; its value is the whole configuration."""

    INTERFACE = MANAGER_INTERFACE
    value: Config

    def __init__(self, engine: Appliance, value: Config, peer: Peer, replication: Replication) -> None:
        super().__init__(engine, value)
        self.peer = peer
        self.replication = replication

    @dbus_property(access=READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=READ)
    def NodeId(self) -> "s":
        return self.value.node_id

    @dbus_property(access=READ)
    def IqnPrefix(self) -> "s":
        return self.value.iqn_prefix

    @dbus_method()
    @translate_errors
    async def CreateDisk(self, name: "s", size: "t", options: "a{sv}") -> "o":
        opts = Options("CreateDisk", options, {"path": "s", "description": "s", "write_back": "b"})
        disk = await self.engine.create_disk(
            name, size, opts.get("path", ""), opts.get("description", ""), opts.get("write_back", False)
        )
        return paths.disk_path(disk.name)

    @dbus_method()
    @translate_errors
    async def CreateBlockDisk(self, name: "s", device: "s", options: "a{sv}") -> "o":
        opts = Options("CreateBlockDisk", options, {"description": "s"})
        disk = await self.engine.create_block_disk(name, device, opts.get("description", ""))
        return paths.disk_path(disk.name)

    @dbus_method()
    @translate_errors
    async def ImportDisk(self, path: "s", options: "a{sv}") -> "o":
        opts = Options("ImportDisk", options, {"name": "s", "description": "s"})
        disk = await self.engine.import_disk(path, opts.get("name", ""), opts.get("description", ""))
        return paths.disk_path(disk.name)

    @dbus_method()
    @translate_errors
    async def CreateTarget(self, name: "s", options: "a{sv}") -> "o":
        opts = Options("CreateTarget", options, {"iqn": "s", "description": "s", "alias": "s"})
        target = await self.engine.create_target(
            name, opts.get("iqn", ""), opts.get("description", ""), opts.get("alias", "")
        )
        return paths.target_path(target.name)

    @dbus_property(access=READ)
    def DiscoveryAuthentication(self) -> "s":
        return describe_chap(self.value.discovery_chap)

    @dbus_method()
    @translate_errors
    async def SetDiscoveryChap(self, credentials: "a{sv}", options: "a{sv}") -> None:
        Options("SetDiscoveryChap", options, {})
        await self.engine.set_discovery_chap(chap_from("SetDiscoveryChap", credentials))

    @dbus_method()
    @translate_errors
    async def CreateBootProfile(self, name: "s", target: "o", initiator: "s", options: "a{sv}") -> "o":
        opts = Options(
            "CreateBootProfile",
            options,
            {"lun": "u", "mac": "s", "portal": "s", "secondary_portal": "s", "firmware": "s"},
        )
        target_name = _name_from_path(target, paths.target_path, self.engine.config.targets, "target")
        client = await self.engine.create_boot_client(name, target_name, initiator, **opts.values())
        return paths.boot_profile_path(client.name)

    @dbus_method()
    @translate_errors
    async def ExportConfiguration(self, options: "a{sv}") -> "s":
        Options("ExportConfiguration", options, {})
        return json.dumps(self.engine.export_configuration(), indent=2, sort_keys=True)

    @dbus_method()
    @translate_errors
    async def ImportConfiguration(self, configuration: "s", options: "a{sv}") -> None:
        opts = Options("ImportConfiguration", options, {"force": "b"})
        await self.engine.import_configuration(configuration, opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def ImportTargetcli(self, saveconfig: "s", options: "a{sv}") -> None:
        Options("ImportTargetcli", options, {})
        await self.engine.import_targetcli(saveconfig)

    @dbus_method()
    @translate_errors
    async def CreatePortal(self, address: "s", port: "q", options: "a{sv}") -> "o":
        opts = Options("CreatePortal", options, {"targets": "ao"})
        targets = [
            _name_from_path(path, paths.target_path, self.engine.config.targets, "target")
            for path in opts.get("targets", [])
        ]
        portal = await self.engine.create_portal(address, port, targets)
        return paths.portal_path(portal.key)

    @dbus_method()
    @translate_errors
    async def CreatePair(self, peer_address: "s", key: "ay", options: "a{sv}") -> "o":
        # The key is an argument of this one call: it is never logged, stored only in the
        # 0600 pair file, and no property or error gives it back.
        opts = Options("CreatePair", options, {"aux_address": "s", "port": "q", "local_addresses": "as"})
        await self.peer.pair(
            peer_address,
            bytes(key),
            opts.get("port", PEER_DEFAULT_PORT),
            opts.get("aux_address", ""),
            opts.get("local_addresses", []),
        )
        return PEER_PATH

    @dbus_method()
    @translate_errors
    async def CreateMirror(self, disk: "o", mode: "s", options: "a{sv}") -> "o":
        opts = Options("CreateMirror", options, {"peer_disk": "s", "skip_initial_sync": "b", "region": "u"})
        name = _name_from_path(disk, paths.disk_path, self.engine.config.disks, "disk")
        await self.replication.create(name, mode, **opts.values())
        return paths.mirror_path(name)

    @dbus_method()
    @translate_errors
    async def GetVolumeState(self, disk: "s", options: "a{sv}") -> "u":
        """The mirror state of a disk by name, as a bare number (GETVOLUMEDRVSTATE)."""
        Options("GetVolumeState", options, {})
        return self.replication.volume_state(disk)

    @dbus_method()
    @translate_errors
    async def ListSeenInitiators(self, options: "a{sv}") -> "aa{sv}":
        Options("ListSeenInitiators", options, {})
        return [
            {
                "Node": Variant("s", seen.node),
                "Target": Variant("s", seen.target),
                "Initiator": Variant("s", seen.initiator),
                "Address": Variant("s", seen.address),
                "Outcome": Variant("s", seen.outcome),
                "Reason": Variant("s", seen.reason),
                "Count": Variant("t", seen.count),
                "FirstSeen": Variant("t", int(seen.first_seen)),
                "LastSeen": Variant("t", int(seen.last_seen)),
            }
            for seen in self.engine.seen.recent()
        ]


class DiskInterface(EntityInterface):
    INTERFACE = DISK_INTERFACE
    # The disk, its status ("online", "missing": its backing is absent, "locked": the
    # peer's mirror copy) and why.
    value: tuple[Disk, str, str]

    @property
    def disk(self) -> Disk:
        return self.value[0]

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.disk.name

    @dbus_property(access=READ)
    def Path(self) -> "s":
        return self.disk.path

    @dbus_property(access=READ)
    def Size(self) -> "t":
        return self.disk.size

    @dbus_property(access=READ)
    def Serial(self) -> "s":
        return self.disk.serial

    @dbus_property(access=READ)
    def Description(self) -> "s":
        return self.disk.description

    @dbus_property(access=READ)
    def WriteBack(self) -> "b":
        return self.disk.write_back

    @dbus_property(access=READ)
    def Kind(self) -> "s":
        return self.disk.kind

    @dbus_property(access=READ)
    def Shared(self) -> "b":
        return self.disk.shared

    @dbus_property(access=READ)
    def Status(self) -> "s":
        return self.value[1]

    @dbus_property(access=READ)
    def StatusReason(self) -> "s":
        return self.value[2]

    @dbus_property(access=READ)
    def Backstore(self) -> "s":
        return self.disk.backstore

    @dbus_method()
    @translate_errors
    async def Modify(self, changes: "a{sv}", options: "a{sv}") -> None:
        settings = Options("Modify", changes, {"description": "s", "shared": "b", "backstore": "s"})
        opts = Options("Modify", options, {"force": "b"})
        await self.engine.modify_disk(self.disk.name, **settings.values(), force=opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def Extend(self, size: "t", options: "a{sv}") -> None:
        Options("Extend", options, {})
        await self.engine.extend_disk(self.disk.name, size)

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"remove_file": "b"})
        await self.engine.delete_disk(self.disk.name, opts.get("remove_file", False))


class TargetInterface(EntityInterface):
    INTERFACE = TARGET_INTERFACE
    value: Target

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.value.name

    @dbus_property(access=READ)
    def Iqn(self) -> "s":
        return self.value.iqn

    @dbus_property(access=READ)
    def Description(self) -> "s":
        return self.value.description

    @dbus_property(access=READ)
    def Alias(self) -> "s":
        return self.value.alias or self.value.name

    @dbus_property(access=READ)
    def Enabled(self) -> "b":
        return self.value.enabled

    @dbus_property(access=READ)
    def HeaderDigest(self) -> "s":
        return self.value.header_digest

    @dbus_property(access=READ)
    def DataDigest(self) -> "s":
        return self.value.data_digest

    @dbus_property(access=READ)
    async def Sessions(self) -> "aa{sv}":
        # The object's own value leaves LUNs and ACLs out (they are objects of their own).
        target = self.engine.config.targets[self.value.name]
        return [
            {
                "Initiator": Variant("s", session.initiator),
                "State": Variant("s", session.state),
                "Addresses": Variant("as", list(session.addresses)),
                "Portals": Variant("as", list(session.portals)),
                "Isid": Variant("s", session.isid),
                "Tsih": Variant("q", session.tsih),
                # LIO enforces the ACL's CHAP at login, so a logged-in session has passed it.
                "Authentication": Variant("s", describe_chap(_acl_chap(target, session.initiator))),
                "Luns": Variant("au", [lun.number for lun in target.luns]),
                "Negotiated": Variant("a{ss}", self.engine.seen.negotiated(target.iqn, session.initiator)),
            }
            for session in (await self.engine.sessions(target.iqn)).sessions
        ]

    @dbus_property(access=READ)
    async def SessionCount(self) -> "u":
        return (await self.engine.sessions(self.value.iqn)).count

    @dbus_property(access=READ)
    async def Connections(self) -> "a(sqs)":
        return [
            [c.source_address, c.source_port, c.portal]
            for c in (await self.engine.sessions(self.value.iqn)).connections
        ]

    @dbus_property(access=READ)
    def Authentication(self) -> "s":
        return describe_chap(self.value.chap)

    @dbus_method()
    @translate_errors
    async def SetChap(self, credentials: "a{sv}", options: "a{sv}") -> None:
        Options("SetChap", options, {})
        await self.engine.set_target_chap(self.value.name, chap_from("SetChap", credentials))

    @dbus_method()
    @translate_errors
    async def Modify(self, changes: "a{sv}", options: "a{sv}") -> None:
        settings = Options(
            "Modify",
            changes,
            {"description": "s", "alias": "s", "enabled": "b", "iqn": "s", "header_digest": "s", "data_digest": "s"},
        )
        opts = Options("Modify", options, {"force": "b"})
        await self.engine.modify_target(self.value.name, **settings.values(), force=opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        await self.engine.delete_target(self.value.name, opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def AddLun(self, disk: "o", options: "a{sv}") -> "o":
        opts = Options("AddLun", options, {"lun": "u", "read_only": "b"})
        disk_name = _name_from_path(disk, paths.disk_path, self.engine.config.disks, "disk")
        lun = await self.engine.add_lun(self.value.name, disk_name, opts.get("lun", None), opts.get("read_only", False))
        return paths.lun_path(self.value.name, lun.number)

    @dbus_method()
    @translate_errors
    async def AddAcl(self, initiator: "s", options: "a{sv}") -> "o":
        Options("AddAcl", options, {})
        acl = await self.engine.add_acl(self.value.name, initiator)
        return paths.acl_path(self.value.name, acl.initiator)

    @dbus_property(access=READ)
    def AllowedSources(self) -> "as":
        return list(self.value.allowed_sources)

    @dbus_method()
    @translate_errors
    async def SetAllowedSources(self, sources: "as", options: "a{sv}") -> None:
        opts = Options("SetAllowedSources", options, {"force": "b"})
        await self.engine.set_allowed_sources(self.value.name, sources, opts.get("force", False))


class LunInterface(EntityInterface):
    INTERFACE = LUN_INTERFACE
    value: tuple[str, Lun]  # (target name, LUN)

    @dbus_property(access=READ)
    def Number(self) -> "u":
        return self.value[1].number

    @dbus_property(access=READ)
    def Disk(self) -> "o":
        return paths.disk_path(self.value[1].disk)

    @dbus_property(access=READ)
    def ReadOnly(self) -> "b":
        return self.value[1].read_only

    @dbus_property(access=READ)
    def Target(self) -> "o":
        return paths.target_path(self.value[0])

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        target, lun = self.value
        await self.engine.remove_lun(target, lun.number, opts.get("force", False))


class AclInterface(EntityInterface):
    INTERFACE = ACL_INTERFACE
    value: tuple[str, Acl]  # (target name, ACL)

    @dbus_property(access=READ)
    def Initiator(self) -> "s":
        return self.value[1].initiator

    @dbus_property(access=READ)
    def Target(self) -> "o":
        return paths.target_path(self.value[0])

    @dbus_property(access=READ)
    def Authentication(self) -> "s":
        """This initiator's own credentials; "inherited" when the target's apply."""
        return describe_chap(self.value[1].chap) if self.value[1].chap else "inherited"

    @dbus_method()
    @translate_errors
    async def Logout(self, options: "a{sv}") -> None:
        Options("Logout", options, {})
        target, acl = self.value
        await self.engine.force_logout(target, acl.initiator)

    @dbus_method()
    @translate_errors
    async def SetChap(self, credentials: "a{sv}", options: "a{sv}") -> None:
        Options("SetChap", options, {})
        target, acl = self.value
        await self.engine.set_acl_chap(target, acl.initiator, chap_from("SetChap", credentials))

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        target, acl = self.value
        await self.engine.remove_acl(target, acl.initiator, opts.get("force", False))


class PortalInterface(EntityInterface):
    INTERFACE = PORTAL_INTERFACE
    value: Portal

    @dbus_property(access=READ)
    def Address(self) -> "s":
        return self.value.address

    @dbus_property(access=READ)
    def Port(self) -> "q":
        return self.value.port

    @dbus_property(access=READ)
    def Targets(self) -> "ao":
        """The targets served here; empty: every target."""
        return [paths.target_path(name) for name in self.value.targets]

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        Options("Delete", options, {})
        await self.engine.delete_portal(self.value.key)


def _name_from_path(path: str, to_path: Any, entities: dict[str, Any], kind: str) -> str:
    for name in entities:
        if to_path(name) == path:
            return name
    raise InvalidArgument(f"{path} is not the object path of a {kind}")


class BootProfileInterface(EntityInterface):
    INTERFACE = BOOT_PROFILE_INTERFACE
    value: tuple[BootClient, bootprofile.BootProfile]

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.value[0].name

    @dbus_property(access=READ)
    def Target(self) -> "o":
        return paths.target_path(self.value[0].target)

    @dbus_property(access=READ)
    def Initiator(self) -> "s":
        return self.value[0].initiator

    @dbus_property(access=READ)
    def Lun(self) -> "u":
        return self.value[0].lun

    @dbus_property(access=READ)
    def Mac(self) -> "s":
        return self.value[0].mac

    @dbus_property(access=READ)
    def RootPath(self) -> "s":
        return bootprofile.root_path(self.value[1].primary)

    @dbus_property(access=READ)
    def Firmware(self) -> "s":
        return self.value[1].firmware

    @dbus_property(access=READ)
    def DhcpConfigs(self) -> "a{ss}":
        return bootprofile.render_all(self.value[1])

    @dbus_method()
    @translate_errors
    async def DhcpConfigsWithSecrets(self, options: "a{sv}") -> "a{ss}":
        # Only root may call it (bus policy): the snippets carry the CHAP secrets.
        Options("DhcpConfigsWithSecrets", options, {})
        return bootprofile.render_all(self.value[1], secrets=True)

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        Options("Delete", options, {})
        await self.engine.delete_boot_client(self.value[0].name)


class ObjectTree:
    """Keeps the exported entity objects equal to the engine's configuration."""

    def __init__(
        self, bus: MessageBus, engine: Appliance, peer: Peer, replication: Replication, failover: Failover
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.peer = peer
        self.replication = replication
        self._exported: dict[str, EntityInterface] = {}
        self._peer_object: PeerInterface | None = None
        self.manager = ManagerInterface(engine, engine.config, peer, replication)
        bus.export(ROOT_PATH, self.manager)
        self.mirrors = MirrorObjects(bus, replication)
        self.failover = FailoverInterface(failover)
        bus.export(FAILOVER_PATH, self.failover)
        failover.add_listener(self.failover.refresh)
        engine.add_listener(self.sync)
        peer.add_listener(self.sync_peer)
        # A copy locked or unlocked changes its disk's status.
        replication.add_listener(lambda disk, event: self.sync(self.engine.config))

    def sync_peer(self) -> None:
        """Export the pair's object while paired, and announce its connectivity."""
        if self.peer.record is None:
            if self._peer_object is not None:
                self.bus.unexport(PEER_PATH, self._peer_object)
                self._peer_object = None
        elif self._peer_object is None:
            self._peer_object = PeerInterface(self.peer)
            self.bus.export(PEER_PATH, self._peer_object)
        else:
            self._peer_object.refresh()

    def sync(self, config: Config) -> None:
        self.manager.refresh(config)
        wanted = {path: (cls, value) for path, cls, value in self._entities(config)}
        for path in [p for p in self._exported if p not in wanted]:
            self.bus.unexport(path, self._exported.pop(path))
        for path, (cls, value) in wanted.items():
            exported = self._exported.get(path)
            if exported is None:
                exported = self._exported[path] = cls(self.engine, value)
                self.bus.export(path, exported)
            elif exported.value != value:
                exported.refresh(value)

    def _entities(self, config: Config) -> Iterator[tuple[str, type[EntityInterface], Any]]:
        locked = self.replication.unserved()
        for disk in config.disks.values():
            if disk.name in self.engine.missing:
                status = ("missing", self.engine.missing[disk.name])
            elif disk.name in locked:
                status = ("locked", locked[disk.name])
            else:
                status = ("online", "")
            yield paths.disk_path(disk.name), DiskInterface, (disk, *status)
        for portal in config.portals:
            yield paths.portal_path(portal.key), PortalInterface, portal
        for target in config.targets.values():
            # LUNs and ACLs are objects of their own; they do not change the target object.
            yield paths.target_path(target.name), TargetInterface, dataclasses.replace(target, luns=(), acls=())
            for lun in target.luns:
                yield paths.lun_path(target.name, lun.number), LunInterface, (target.name, lun)
            for acl in target.acls:
                yield paths.acl_path(target.name, acl.initiator), AclInterface, (target.name, acl)
        for client in config.boot_clients.values():
            profile = bootprofile.profile_for(client, config.targets[client.target])
            yield paths.boot_profile_path(client.name), BootProfileInterface, (client, profile)
