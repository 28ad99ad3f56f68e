"""The pair's D-Bus object: the peer link's status, and unpairing.

Exported at ``PEER_PATH`` while the node is paired. Properties are read from the link
when asked; PropertiesChanged is sent when connectivity changes (connected, paths up or
down, a new session, the peer's node id learnt), not for every new round-trip time. No
property, and no error, ever carries the key.
"""

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_method, dbus_property

from applianced.bus.announcing import AnnouncingInterface
from applianced.bus.errors import translate_errors
from applianced.bus.options import Options
from applianced.constants import PEER_INTERFACE
from applianced.peer.link import LinkStatus
from applianced.peer.pairing import PairRecord
from applianced.peer.service import Peer

READ = PropertyAccess.READ
# Announced on a change of connectivity; the others (times, counters) are read when needed.
ANNOUNCED = ("Connected", "Paths", "SessionStarted", "PeerNodeId")


class PeerInterface(AnnouncingInterface):
    def __init__(self, peer: Peer) -> None:
        super().__init__(PEER_INTERFACE)
        self.peer = peer
        self.start_announcing()

    def announced_names(self) -> list[str]:
        return list(ANNOUNCED)

    @property
    def _record(self) -> PairRecord:
        assert self.peer.record is not None
        return self.peer.record

    @property
    def _status(self) -> LinkStatus:
        status = self.peer.status()
        assert status is not None
        return status

    @dbus_property(access=READ)
    def PeerAddress(self) -> "s":
        return self._record.peer_address

    @dbus_property(access=READ)
    def AuxAddress(self) -> "s":
        return self._record.aux_address

    @dbus_property(access=READ)
    def Port(self) -> "q":
        return self._record.port

    @dbus_property(access=READ)
    def LocalAddresses(self) -> "as":
        return list(self._record.local_addresses)

    @dbus_property(access=READ)
    def PeerNodeId(self) -> "s":
        return self._record.peer_node or self._status.peer_node

    @dbus_property(access=READ)
    def Connected(self) -> "b":
        return self._status.connected

    @dbus_property(access=READ)
    def SessionStarted(self) -> "d":
        return self._status.session_started

    @dbus_property(access=READ)
    def Paths(self) -> "a(ssbdd)":
        return [
            [path.address, path.role, path.up, -1.0 if path.rtt is None else path.rtt, path.last_received]
            for path in self._status.paths
        ]

    @dbus_property(access=READ)
    def LastMessage(self) -> "d":
        return self._status.last_message

    @dbus_property(access=READ)
    def LastMessageKind(self) -> "s":
        return self._status.last_message_kind

    @dbus_property(access=READ)
    def ClockOffset(self) -> "d":
        offset = self._status.clock_offset
        return 0.0 if offset is None else offset

    @dbus_property(access=READ)
    def ClockOffsetKnown(self) -> "b":
        return self._status.clock_offset is not None

    @dbus_property(access=READ)
    def Drops(self) -> "a{st}":
        return self._status.drops

    @dbus_method()
    @translate_errors
    async def Delete(self, options: "a{sv}") -> None:
        Options("Delete", options, {})
        await self.peer.unpair()
