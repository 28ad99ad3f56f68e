"""Calls into applianced's D-Bus API that never raise and never hang, and the documented API.

The fuzz tier makes thousands of calls with adversarial values: each must come back as a
result or as a named error within a deadline, so that a daemon that hangs or answers with
something else is a test failure with the call that caused it, not a hung CI run.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from applianced.constants import BUS_NAME, ROOT_PATH
from tests.support.daemon import REPO

DOCUMENTED_API = REPO / "dbus" / "org.applianced.Appliance1.xml"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True)
class Method:
    """A documented method: its interface, name and input arguments as (name, signature)."""

    interface: str
    name: str
    args: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        return f"{self.interface.rsplit('.', 1)[-1]}.{self.name}"

    @property
    def signature(self) -> str:
        return "".join(signature for _, signature in self.args)


def documented_methods(xml_path: Path = DOCUMENTED_API) -> list[Method]:
    """Every method of every applianced interface in the introspection document."""
    methods = []
    for interface in ET.parse(xml_path).getroot().iter("interface"):
        for method in interface.iter("method"):
            args = tuple(
                (arg.get("name", ""), arg.get("type", ""))
                for arg in method.iter("arg")
                if arg.get("direction", "in") == "in"
            )
            methods.append(Method(interface.get("name", ""), method.get("name", ""), args))
    return methods


@dataclass(frozen=True)
class Outcome:
    """What one call gave: a body, a D-Bus error (name and text), or nothing in time."""

    body: list[Any] | None = None
    error: str | None = None
    text: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out

    def __str__(self) -> str:
        if self.timed_out:
            return "no answer in time"
        return f"{self.error}: {self.text}" if self.error else "ok"


class ApiClient:
    """A blocking client on its own event loop; every call has a deadline."""

    def __init__(self, address: str, timeout: float = 10) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()

        async def connect() -> MessageBus:
            return await MessageBus(bus_address=address).connect()

        self.bus = self.loop.run_until_complete(connect())

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()

    def call(
        self, path: str, interface: str, member: str, signature: str = "", body: list[Any] | None = None
    ) -> Outcome:
        message = Message(
            destination=BUS_NAME, path=path, interface=interface, member=member, signature=signature, body=body or []
        )
        try:
            reply = self.loop.run_until_complete(asyncio.wait_for(self.bus.call(message), self.timeout))
        except TimeoutError:
            return Outcome(timed_out=True)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else repr(reply.body)
            return Outcome(error=reply.error_name or "", text=text)
        return Outcome(body=reply.body)

    def method(self, path: str, method: Method, args: list[Any]) -> Outcome:
        return self.call(path, method.interface, method.name, method.signature, args)

    def objects(self) -> Outcome:
        return self.call(ROOT_PATH, OBJECT_MANAGER, "GetManagedObjects")

    def property(self, path: str, interface: str, name: str) -> Outcome:
        return self.call(path, PROPERTIES, "Get", "ss", [interface, name])
