"""Does this node still reach the network? One ICMP echo to a ping node, over the data NIC.

A ping node is a host that is neither storage node (a router, a switch's address): a node
that reaches no ping node is the isolated one and must never take over. The echo is sent
from the data interface (SO_BINDTODEVICE), so a route over the heartbeat NIC cannot make
a dead data link look alive. Raw sockets, so root; the call blocks for at most its timeout
and is meant for a worker thread.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time

ECHO_REQUEST_V4, ECHO_REPLY_V4 = 8, 0
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129
PAYLOAD_SIZE = 16


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(version: int, identifier: int, sequence: int, payload: bytes) -> bytes:
    if version == 6:
        # The kernel fills in the checksum of raw ICMPv6 sockets (it covers a pseudo-header).
        return struct.pack("!BBHHH", ECHO_REQUEST_V6, 0, 0, identifier, sequence) + payload
    header = struct.pack("!BBHHH", ECHO_REQUEST_V4, 0, 0, identifier, sequence)
    total = checksum(header + payload)
    return struct.pack("!BBHHH", ECHO_REQUEST_V4, 0, total, identifier, sequence) + payload


def _reply(version: int, packet: bytes) -> bytes:
    """The ICMP message in what a raw socket received (IPv4 sockets include the IP header)."""
    if version == 4:
        return packet[(packet[0] & 0x0F) * 4 :] if packet else b""
    return packet


def reaches(address: str, interface: str = "", timeout: float = 1.0) -> float | None:
    """The round-trip time to ``address`` in seconds, or None if no echo reply came in time."""
    version = ipaddress.ip_address(address).version
    family, protocol = (
        (socket.AF_INET, socket.IPPROTO_ICMP) if version == 4 else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    )
    identifier = int.from_bytes(os.urandom(2), "big")
    payload = os.urandom(PAYLOAD_SIZE)
    want_type = ECHO_REPLY_V4 if version == 4 else ECHO_REPLY_V6
    with socket.socket(family, socket.SOCK_RAW, protocol) as sock:
        if interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except OSError:
                return None  # no such interface: nothing is reached over it
        start = time.monotonic()
        deadline = start + timeout
        try:
            sock.sendto(_echo(version, identifier, 1, payload), (address, 0))
        except OSError:
            return None  # no route, interface down: not reached
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                return None
            packet, source = sock.recvfrom(2048)
            message = _reply(version, packet)
            if (
                len(message) >= 8 + PAYLOAD_SIZE
                and message[0] == want_type
                and struct.unpack_from("!HH", message, 4) == (identifier, 1)
                and message[8 : 8 + PAYLOAD_SIZE] == payload
                and ipaddress.ip_address(source[0].split("%")[0]) == ipaddress.ip_address(address)
            ):
                return time.monotonic() - start
    return None
