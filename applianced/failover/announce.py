"""Telling the data network where a virtual IP lives, and asking whether someone holds it.

A node that takes an address over announces it: gratuitous ARP for IPv4 (a request whose
sender and target are the address, as keepalived and ``arping -U`` send it), an unsolicited
neighbour advertisement with the override flag for IPv6 (RFC 4861 7.2.6). Hosts and
switches that know the address under the old node's MAC learn the new one at once instead
of after their caches expire. Before it takes an address, a node asks: an ARP probe
(RFC 5227: sender address 0.0.0.0, so no cache learns anything from it) or a neighbour
solicitation; an answer means the address is still served, by the peer or by anyone else.

Raw sockets, so root (CAP_NET_RAW); the calls block for at most their timeout and are meant
for a worker thread.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from applianced.errors import KernelError
from applianced.failover.addresses import VirtualAddress

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARP_REQUEST, ARP_REPLY = 1, 2
BROADCAST_MAC = b"\xff" * 6
ICMPV6_NEIGHBOUR_SOLICITATION, ICMPV6_NEIGHBOUR_ADVERTISEMENT = 135, 136
NA_OVERRIDE = 0x20000000
OPTION_SOURCE_LINK_ADDRESS, OPTION_TARGET_LINK_ADDRESS = 1, 2
# Neighbour discovery is only believed from the link itself (RFC 4861 7.1).
ND_HOP_LIMIT = 255
ALL_NODES = "ff02::1"
# Repeated, as keepalived does: a single frame can be lost, and a switch may learn late.
ANNOUNCEMENTS = 3
ANNOUNCE_INTERVAL = 0.2
PROBES = 2
PROBE_TIMEOUT = 0.3


def _arp_frame(mac: bytes, operation: int, sender: bytes, target_mac: bytes, target: bytes) -> bytes:
    ethernet = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    return ethernet + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, operation, mac, sender, target_mac, target)


def _packet_socket(interface: str) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        sock.bind((interface, ETH_P_ARP))
    except OSError:
        sock.close()
        raise
    return sock, sock.getsockname()[4]


def _icmpv6_socket(interface: str, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        index = socket.if_nametoindex(interface)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ND_HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        if source:
            sock.bind((source, 0, 0, index))
    except OSError:
        sock.close()
        raise
    return sock


def _interface_mac(interface: str) -> bytes:
    with open(f"/sys/class/net/{interface}/address") as file:
        return bytes.fromhex(file.read().strip().replace(":", ""))


def announce(vip: VirtualAddress, count: int = ANNOUNCEMENTS, interval: float = ANNOUNCE_INTERVAL) -> None:
    """Announce ``vip`` (configured on this node) ``count`` times, ``interval`` seconds apart;
    KernelError when the interface cannot send."""
    try:
        _announce(vip, count, interval)
    except OSError as exc:
        raise KernelError(f"cannot announce {vip.address} on {vip.interface}: {exc.strerror}") from None


def _announce(vip: VirtualAddress, count: int, interval: float) -> None:
    if vip.version == 4:
        sock, mac = _packet_socket(vip.interface)
        address = socket.inet_aton(vip.address)
        frame = _arp_frame(mac, ARP_REQUEST, address, b"\0" * 6, address)
    else:
        # The kernel fills in the ICMPv6 checksum of raw ICMPv6 sockets.
        sock = _icmpv6_socket(vip.interface, vip.address)
        mac = _interface_mac(vip.interface)
        target = socket.inet_pton(socket.AF_INET6, vip.address)
        option = struct.pack("!BB6s", OPTION_TARGET_LINK_ADDRESS, 1, mac)
        frame = struct.pack("!BBHI16s", ICMPV6_NEIGHBOUR_ADVERTISEMENT, 0, 0, NA_OVERRIDE, target) + option
    with sock:
        for sent in range(count):
            if vip.version == 4:
                sock.send(frame)
            else:
                sock.sendto(frame, (ALL_NODES, 0, 0, socket.if_nametoindex(vip.interface)))
            if sent + 1 < count:
                time.sleep(interval)


def _solicited_node_group(address: str) -> str:
    low = ipaddress.IPv6Address(address).packed[-3:]
    return str(ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + low))


def _wait(sock: socket.socket, deadline: float, answer) -> str | None:
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            return None
        found = answer(sock.recv(2048))
        if found:
            return found
    return None


def in_use(vip: VirtualAddress, probes: int = PROBES, timeout: float = PROBE_TIMEOUT) -> str | None:
    """The MAC of whoever answers for ``vip`` on its interface's network, else None;
    KernelError when the interface cannot be used (gone, down).

    Asked from this node's interface, so this node's own copy of the address (if any)
    never answers.
    """
    try:
        if vip.version == 4:
            return _arp_in_use(vip, probes, timeout)
        return _nd_in_use(vip, probes, timeout)
    except OSError as exc:
        raise KernelError(f"cannot ask who holds {vip.address} on {vip.interface}: {exc.strerror}") from None


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


def _arp_in_use(vip: VirtualAddress, probes: int, timeout: float) -> str | None:
    sock, mac = _packet_socket(vip.interface)
    address = socket.inet_aton(vip.address)
    probe = _arp_frame(mac, ARP_REQUEST, b"\0" * 4, b"\0" * 6, address)

    def answer(frame: bytes) -> str | None:
        if len(frame) < 42:
            return None
        operation, sender_mac, sender = struct.unpack_from("!6xH6s4s", frame, 14)
        # A reply from the holder, or its own announcement or use of the address.
        if operation in (ARP_REQUEST, ARP_REPLY) and sender == address and sender_mac != mac:
            return _mac_text(sender_mac)
        return None

    with sock:
        for _ in range(probes):
            sock.send(probe)
            found = _wait(sock, time.monotonic() + timeout, answer)
            if found:
                return found
    return None


def _nd_in_use(vip: VirtualAddress, probes: int, timeout: float) -> str | None:
    # From the interface's link-local address (the kernel picks it for a link-scope group):
    # the holder answers it with a solicited advertisement.
    sock = _icmpv6_socket(vip.interface, "")
    target = socket.inet_pton(socket.AF_INET6, vip.address)
    mac = _interface_mac(vip.interface)
    option = struct.pack("!BB6s", OPTION_SOURCE_LINK_ADDRESS, 1, mac)
    solicitation = struct.pack("!BBHI16s", ICMPV6_NEIGHBOUR_SOLICITATION, 0, 0, 0, target) + option
    group = (_solicited_node_group(vip.address), 0, 0, socket.if_nametoindex(vip.interface))

    def answer(message: bytes) -> str | None:
        if len(message) < 24 or message[0] != ICMPV6_NEIGHBOUR_ADVERTISEMENT or message[8:24] != target:
            return None
        options = message[24:]
        while len(options) >= 8 and options[1]:
            if options[0] == OPTION_TARGET_LINK_ADDRESS:
                return _mac_text(options[2:8])
            options = options[options[1] * 8 :]
        return "unknown"

    with sock:
        for _ in range(probes):
            try:
                sock.sendto(solicitation, group)
            except OSError:
                return None  # no IPv6 on the interface (or it is down): nobody answers there
            found = _wait(sock, time.monotonic() + timeout, answer)
            if found:
                return found
    return None
