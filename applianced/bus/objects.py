"""The exported D-Bus objects: the manager at the root and one object per entity.

Handlers only unpack arguments, call the engine and return object paths; validation and
every decision live in the engine. Entity objects hold the current value of their entity
and are kept in step with the configuration by ``ObjectTree``.
"""

import dataclasses
from typing import Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from applianced import __version__
from applianced.bus import paths
from applianced.bus.errors import translate_errors
from applianced.constants import (
    ACL_INTERFACE,
    DISK_INTERFACE,
    LUN_INTERFACE,
    MANAGER_INTERFACE,
    PORTAL_INTERFACE,
    ROOT_PATH,
    TARGET_INTERFACE,
)
from applianced.engine import Appliance
from applianced.errors import InvalidArgument
from applianced.state import Acl, Config, Disk, Lun, Portal, Target

READ = PropertyAccess.READ


class Options:
    """The ``a{sv}`` options argument: known keys with checked types, unknown keys refused."""

    def __init__(self, method: str, options: dict[str, Variant], allowed: dict[str, str]) -> None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InvalidArgument(f"{method} does not take option(s) {', '.join(unknown)}")
        for key, variant in options.items():
            if variant.signature != allowed[key]:
                raise InvalidArgument(
                    f"option {key} of {method} must have type '{allowed[key]}', not '{variant.signature}'"
                )
        self._values = {key: variant.value for key, variant in options.items()}

    def get(self, key: str, default: Any) -> Any:
        return self._values.get(key, default)


class ManagerInterface(ServiceInterface):
    """Creates entities and describes the node."""

    def __init__(self, engine: Appliance) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.engine = engine

    @dbus_property(access=READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=READ)
    def NodeId(self) -> "s":
        return self.engine.config.node_id

    @dbus_property(access=READ)
    def IqnPrefix(self) -> "s":
        return self.engine.config.iqn_prefix

    @dbus_method()
    @translate_errors
    async def CreateDisk(self, name: "s", size: "t", options: "a{sv}") -> "o":
        opts = Options("CreateDisk", options, {"path": "s", "description": "s"})
        disk = await self.engine.create_disk(name, size, opts.get("path", ""), opts.get("description", ""))
        return paths.disk_path(disk.name)

    @dbus_method()
    @translate_errors
    async def CreateTarget(self, name: "s", options: "a{sv}") -> "o":
        opts = Options("CreateTarget", options, {"iqn": "s", "description": "s"})
        target = await self.engine.create_target(name, opts.get("iqn", ""), opts.get("description", ""))
        return paths.target_path(target.name)

    @dbus_method()
    @translate_errors
    async def CreatePortal(self, address: "s", port: "q", options: "a{sv}") -> "o":
        Options("CreatePortal", options, {})
        portal = await self.engine.create_portal(address, port)
        return paths.portal_path(portal.key)


class DiskInterface(ServiceInterface):
    def __init__(self, engine: Appliance, disk: Disk) -> None:
        super().__init__(DISK_INTERFACE)
        self.engine = engine
        self.disk = disk

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

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"remove_file": "b"})
        await self.engine.delete_disk(self.disk.name, opts.get("remove_file", False))


class TargetInterface(ServiceInterface):
    def __init__(self, engine: Appliance, target: Target) -> None:
        super().__init__(TARGET_INTERFACE)
        self.engine = engine
        self.target = target

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.target.name

    @dbus_property(access=READ)
    def Iqn(self) -> "s":
        return self.target.iqn

    @dbus_property(access=READ)
    def Description(self) -> "s":
        return self.target.description

    @dbus_property(access=READ)
    def Enabled(self) -> "b":
        return self.target.enabled

    @dbus_property(access=READ)
    async def Sessions(self) -> "aa{sv}":
        return [
            {
                "Initiator": Variant("s", session.initiator),
                "State": Variant("s", session.state),
                "Addresses": Variant("as", list(session.addresses)),
            }
            for session in await self.engine.sessions()
            if session.target_iqn == self.target.iqn
        ]

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        await self.engine.delete_target(self.target.name, opts.get("force", False))

    @dbus_method()
    @translate_errors
    async def AddLun(self, disk: "o", options: "a{sv}") -> "o":
        opts = Options("AddLun", options, {"lun": "u"})
        disk_name = _name_from_path(disk, paths.disk_path, self.engine.config.disks, "disk")
        lun = await self.engine.add_lun(self.target.name, disk_name, opts.get("lun", None))
        return paths.lun_path(self.target.name, lun.number)

    @dbus_method()
    @translate_errors
    async def AddAcl(self, initiator: "s", options: "a{sv}") -> "o":
        Options("AddAcl", options, {})
        acl = await self.engine.add_acl(self.target.name, initiator)
        return paths.acl_path(self.target.name, acl.initiator)


class LunInterface(ServiceInterface):
    def __init__(self, engine: Appliance, target: Target, lun: Lun) -> None:
        super().__init__(LUN_INTERFACE)
        self.engine = engine
        self.target = target
        self.lun = lun

    @dbus_property(access=READ)
    def Number(self) -> "u":
        return self.lun.number

    @dbus_property(access=READ)
    def Disk(self) -> "o":
        return paths.disk_path(self.lun.disk)

    @dbus_property(access=READ)
    def Target(self) -> "o":
        return paths.target_path(self.target.name)

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        await self.engine.remove_lun(self.target.name, self.lun.number, opts.get("force", False))


class AclInterface(ServiceInterface):
    def __init__(self, engine: Appliance, target: Target, acl: Acl) -> None:
        super().__init__(ACL_INTERFACE)
        self.engine = engine
        self.target = target
        self.acl = acl

    @dbus_property(access=READ)
    def Initiator(self) -> "s":
        return self.acl.initiator

    @dbus_property(access=READ)
    def Target(self) -> "o":
        return paths.target_path(self.target.name)

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        opts = Options("Delete", options, {"force": "b"})
        await self.engine.remove_acl(self.target.name, self.acl.initiator, opts.get("force", False))


class PortalInterface(ServiceInterface):
    def __init__(self, engine: Appliance, portal: Portal) -> None:
        super().__init__(PORTAL_INTERFACE)
        self.engine = engine
        self.portal = portal

    @dbus_property(access=READ)
    def Address(self) -> "s":
        return self.portal.address

    @dbus_property(access=READ)
    def Port(self) -> "q":
        return self.portal.port

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        Options("Delete", options, {})
        await self.engine.delete_portal(self.portal.key)


def _name_from_path(path: str, to_path: Any, entities: dict[str, Any], kind: str) -> str:
    for name in entities:
        if to_path(name) == path:
            return name
    raise InvalidArgument(f"{path} is not the object path of a {kind}")


class ObjectTree:
    """Keeps the exported entity objects equal to the engine's configuration."""

    def __init__(self, bus: MessageBus, engine: Appliance) -> None:
        self.bus = bus
        self.engine = engine
        self._exported: dict[str, tuple[ServiceInterface, Any]] = {}
        bus.export(ROOT_PATH, ManagerInterface(engine))
        engine.add_listener(self.sync)

    def sync(self, config: Config) -> None:
        wanted = dict(self._entities(config))
        for path in [p for p in self._exported if p not in wanted]:
            interface, _ = self._exported.pop(path)
            self.bus.unexport(path, interface)
        for path, (value, factory) in wanted.items():
            current = self._exported.get(path)
            if current is not None and current[1] == value:
                continue
            if current is not None:
                # A changed entity is re-exported so that watchers see it go and come back
                # with its new properties.
                self.bus.unexport(path, current[0])
            interface = factory()
            self.bus.export(path, interface)
            self._exported[path] = (interface, value)

    def _entities(self, config: Config) -> Any:
        engine = self.engine
        for disk in config.disks.values():
            yield paths.disk_path(disk.name), (disk, lambda d=disk: DiskInterface(engine, d))
        for portal in config.portals:
            yield paths.portal_path(portal.key), (portal, lambda p=portal: PortalInterface(engine, p))
        for target in config.targets.values():
            # LUNs and ACLs are objects of their own; they do not change the target object.
            own = dataclasses.replace(target, luns=(), acls=())
            yield paths.target_path(target.name), (own, lambda t=own: TargetInterface(engine, t))
            for lun in target.luns:
                yield (
                    paths.lun_path(target.name, lun.number),
                    ((target.name, lun), lambda t=target, u=lun: LunInterface(engine, t, u)),
                )
            for acl in target.acls:
                yield (
                    paths.acl_path(target.name, acl.initiator),
                    ((target.name, acl), lambda t=target, a=acl: AclInterface(engine, t, a)),
                )
