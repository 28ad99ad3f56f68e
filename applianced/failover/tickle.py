"""Making initiators reconnect at once after a takeover: the "TCP tickle".

An initiator whose target node died keeps its TCP connection to the virtual IP open until
its own timers give up (open-iscsi's NOP-Out timeout, seconds; TCP retransmission, minutes).
The active node tells the passive node which connections clients hold to the virtual IPs
(``established``, read from the kernel's socket tables each look); after a takeover the new
active node sends each client, from the virtual IP, an ACK that fits no connection
(sequence and acknowledgement 0). The client answers with a challenge ACK carrying its
real sequence numbers (RFC 5961 4); this node has no socket for that connection, so its
kernel answers that with a reset the client accepts, and the initiator logs in again at
once. The trick is CTDB's; it needs nothing from the client.

Raw sockets, so root (CAP_NET_RAW); the calls do not block and are meant for a worker thread.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from applianced.errors import KernelError

TCP_TABLES = {4: Path("/proc/net/tcp"), 6: Path("/proc/net/tcp6")}
TCP_ESTABLISHED = "01"
TCP_ACK = 0x10
# A beat carries at most this many: enough for the initiators of a SAN, and a beat stays small.
MAX_CONNECTIONS = 512
# Repeated, as CTDB does: a single segment can be lost.
TICKLES = 3


@dataclass(frozen=True)
class Connection:
    """A client's TCP connection to an address of this node (its text forms)."""

    address: str
    port: int
    client: str
    client_port: int


def established(addresses: Collection[str], tables: dict[int, Path] = TCP_TABLES) -> tuple[Connection, ...]:
    """The established TCP connections whose local end is one of ``addresses``, oldest
    socket first, at most MAX_CONNECTIONS."""
    wanted = {ipaddress.ip_address(address) for address in addresses}
    found: list[Connection] = []
    for version in sorted({address.version for address in wanted}):
        try:
            lines = tables[version].read_text().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
                continue
            local, local_port = _endpoint(fields[1])
            if local in wanted:
                client, client_port = _endpoint(fields[2])
                found.append(Connection(str(local), local_port, str(client), client_port))
    return tuple(found[:MAX_CONNECTIONS])


def _endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    # The kernel prints each 32-bit word of the (network order) address as a native integer.
    address, port = text.split(":")
    words = [int(address[i : i + 8], 16) for i in range(0, len(address), 8)]
    return ipaddress.ip_address(struct.pack(f"={len(words)}I", *words)), int(port, 16)


def segment(connection: Connection) -> bytes:
    """The tickle for ``connection``: a TCP ACK from its local end, sequence numbers 0."""
    header = struct.pack("!HHIIBBHHH", connection.port, connection.client_port, 0, 0, 5 << 4, TCP_ACK, 1024, 0, 0)
    source = ipaddress.ip_address(connection.address).packed
    destination = ipaddress.ip_address(connection.client).packed
    if len(source) == 4:
        pseudo = source + destination + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
    else:
        pseudo = source + destination + struct.pack("!I3xB", len(header), socket.IPPROTO_TCP)
    checksum = _checksum(pseudo + header)
    return header[:16] + struct.pack("!H", checksum) + header[18:]


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def reset(connections: Iterable[Connection], count: int = TICKLES) -> int:
    """Tickle each connection ``count`` times from its local address, which this node must
    hold now; the number of connections tickled. KernelError when no raw socket can be had;
    a connection whose address is not here (yet) is left out."""
    tickled = 0
    for connection in connections:
        family = socket.AF_INET if ipaddress.ip_address(connection.address).version == 4 else socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        except OSError as exc:
            raise KernelError(f"cannot reset client connections: {exc.strerror}") from None
        with sock:
            try:
                # Bound to the virtual IP: the kernel writes it as the IP source address.
                sock.bind((connection.address, 0))
                tickle = segment(connection)
                for _ in range(count):
                    sock.sendto(tickle, (connection.client, 0))
            except OSError:
                continue
        tickled += 1
    return tickled
