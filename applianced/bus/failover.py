"""The failover's D-Bus object: settings, role, decision and history of this node.

Exported at ``FAILOVER_PATH`` always (a node that is not part of a cluster shows the role
"stopped"). Properties are announced with PropertiesChanged when the failover reports a
change (role, decision, what is heard); the counters are one live property.
"""

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_method, dbus_property

from applianced.bus.announcing import AnnouncingInterface
from applianced.bus.errors import translate_errors
from applianced.bus.options import Options
from applianced.constants import FAILOVER_INTERFACE
from applianced.failover.service import Failover

READ = PropertyAccess.READ


class FailoverInterface(AnnouncingInterface):
    def __init__(self, failover: Failover) -> None:
        super().__init__(FAILOVER_INTERFACE)
        self.failover = failover
        self.start_announcing()

    @dbus_property(access=READ)
    def Role(self) -> "s":
        return self.failover.role.value

    @dbus_property(access=READ)
    def ActiveSince(self) -> "d":
        return self.failover.record.active_since

    @dbus_property(access=READ)
    def Decision(self) -> "s":
        return self.failover.decision.action.value

    @dbus_property(access=READ)
    def Reason(self) -> "s":
        return self.failover.decision.reason

    @dbus_property(access=READ)
    def PeerHeard(self) -> "b":
        return self.failover.peer_heard

    @dbus_property(access=READ)
    def PingNodeReached(self) -> "b":
        return self.failover.ping_node_reached

    @dbus_property(access=READ)
    def ClientConnections(self) -> "u":
        return len(self.failover.client_connections)

    @dbus_property(access=READ)
    def Addresses(self) -> "a(ssu)":
        return [[vip.interface, vip.address, vip.prefix_length] for vip in self.failover.record.addresses]

    @dbus_property(access=READ)
    def PingNodes(self) -> "a(ss)":
        return [[node.address, node.interface] for node in self.failover.record.ping_nodes]

    @dbus_property(access=READ)
    def Targets(self) -> "as":
        return list(self.failover.record.targets)

    @dbus_property(access=READ)
    def HeartbeatInterval(self) -> "d":
        return self.failover.record.interval

    @dbus_property(access=READ)
    def HeartbeatMisses(self) -> "u":
        return self.failover.record.misses

    @dbus_property(access=READ)
    def History(self) -> "a(dssa(sd))":
        return [
            [event.time, event.role, event.reason, [list(step) for step in event.steps]]
            for event in self.failover.record.history
        ]

    @dbus_property(access=READ)
    def Counters(self) -> "a{st}":
        return dict(self.failover.counters)

    @dbus_method()
    @translate_errors
    async def AddAddress(self, interface: "s", address: "s", options: "a{sv}") -> None:
        Options("AddAddress", options, {})
        await self.failover.add_address(interface, address)

    @dbus_method()
    @translate_errors
    async def RemoveAddress(self, interface: "s", address: "s", options: "a{sv}") -> None:
        Options("RemoveAddress", options, {})
        await self.failover.remove_address(interface, address)

    @dbus_method()
    @translate_errors
    async def AddPingNode(self, address: "s", interface: "s", options: "a{sv}") -> None:
        Options("AddPingNode", options, {})
        await self.failover.add_ping_node(address, interface)

    @dbus_method()
    @translate_errors
    async def RemovePingNode(self, address: "s", options: "a{sv}") -> None:
        Options("RemovePingNode", options, {})
        await self.failover.remove_ping_node(address)

    @dbus_method()
    @translate_errors
    async def Protect(self, target: "s", options: "a{sv}") -> None:
        Options("Protect", options, {})
        await self.failover.protect(target)

    @dbus_method()
    @translate_errors
    async def Unprotect(self, target: "s", options: "a{sv}") -> None:
        Options("Unprotect", options, {})
        await self.failover.unprotect(target)

    @dbus_method()
    @translate_errors
    async def SetHeartbeat(self, interval: "d", misses: "u", options: "a{sv}") -> None:
        Options("SetHeartbeat", options, {})
        await self.failover.set_heartbeat(interval, misses)

    @dbus_method()
    @translate_errors
    async def Check(self, options: "a{sv}") -> "as":
        Options("Check", options, {})
        return await self.failover.problems()

    @dbus_method()
    @translate_errors
    async def Start(self, options: "a{sv}") -> None:
        Options("Start", options, {})
        await self.failover.start()

    @dbus_method()
    @translate_errors
    async def Stop(self, options: "a{sv}") -> None:
        Options("Stop", options, {})
        await self.failover.stop()

    @dbus_method()
    @translate_errors
    async def Switchover(self, options: "a{sv}") -> None:
        Options("Switchover", options, {})
        await self.failover.switchover()

    @dbus_method()
    @translate_errors
    async def TakeOver(self, options: "a{sv}") -> None:
        opts = Options("TakeOver", options, {"force": "b"})
        await self.failover.take_over(force=opts.get("force", False))
