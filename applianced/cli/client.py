"""A small D-Bus client for applianced: method calls and the object tree, nothing else."""

from __future__ import annotations

from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageType, unpack_variants
from dbus_fast.aio import MessageBus

from applianced.constants import BUS_NAME, ROOT_PATH


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls) -> Client:
        return cls(await MessageBus(bus_type=BusType.SYSTEM).connect())

    def close(self) -> None:
        self.bus.disconnect()

    async def call(
        self, path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or "unknown", reply.body[0] if reply.body else "")
        return reply.body

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every object below the root: path -> interface -> property -> plain value."""
        (managed,) = await self.call(ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return unpack_variants(managed)

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        (values,) = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
        return unpack_variants(values)
