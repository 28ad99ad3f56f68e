"""Virtual IP addresses on the data NICs, added and removed through netlink (pyroute2).

Both operations are idempotent, so a takeover or a demotion interrupted by a crash of the
daemon is simply repeated. IPv6 addresses are added without duplicate address detection:
the node asks the network itself before it takes an address over (``announce.in_use``),
and DAD would keep the address unusable (tentative) for a second or more.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from applianced.errors import InvalidArgument, NotFound

# linux/if_addr.h
IFA_F_NODAD = 0x02


def check_interface(name: str) -> str:
    """``name`` if it can name a network interface (IFNAMSIZ, no slash), else InvalidArgument."""
    if not name or "/" in name or len(name) > 15 or name in (".", ".."):
        raise InvalidArgument(f"{name!r} is not an interface name")
    return name


@dataclass(frozen=True, order=True)
class VirtualAddress:
    """One virtual IP: ``address`` (canonical text) with its prefix, on ``interface``."""

    interface: str
    address: str
    prefix_length: int

    @classmethod
    def parse(cls, interface: str, text: str) -> VirtualAddress:
        """``10.0.0.10/24`` or ``fd00::10/64`` on ``interface``; anything else is InvalidArgument."""
        try:
            network = ipaddress.ip_interface(text)
        except ValueError:
            raise InvalidArgument(f"virtual address {text!r} is not an address with its prefix length") from None
        if "/" not in text:
            raise InvalidArgument(f"virtual address {text!r} needs its prefix length, e.g. {text}/24")
        address = network.ip
        if address.is_loopback or address.is_multicast or address.is_unspecified or address.is_link_local:
            raise InvalidArgument(f"virtual address {text!r} is not a unicast address clients can reach")
        return cls(check_interface(interface), str(address), network.network.prefixlen)

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix_length} on {self.interface}"


def _index(ipr, interface: str) -> int:
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise NotFound(f"interface {interface} does not exist on this node")
    return found[0]


def add(vip: VirtualAddress) -> None:
    """Configure ``vip`` on its interface; a no-op when it is there already."""
    from pyroute2 import IPRoute  # half of the daemon's import time: only failover needs it

    with IPRoute() as ipr:
        index = _index(ipr, vip.interface)
        extra = {"flags": IFA_F_NODAD} if vip.version == 6 else {}
        ipr.addr("replace", index=index, address=vip.address, prefixlen=vip.prefix_length, **extra)


def remove(vip: VirtualAddress) -> None:
    """Remove ``vip`` from its interface; a no-op when it is not there (or the NIC is gone)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            index = _index(ipr, vip.interface)
        except NotFound:
            return
        try:
            ipr.addr("del", index=index, address=vip.address, prefixlen=vip.prefix_length)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise


def present(vips: list[VirtualAddress]) -> set[VirtualAddress]:
    """Those of ``vips`` configured now on their interfaces."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        configured = {
            (names.get(message["index"]), str(ipaddress.ip_address(message.get("IFA_ADDRESS"))), message["prefixlen"])
            for message in ipr.get_addr()
            if message.get("IFA_ADDRESS")
        }
    return {vip for vip in vips if (vip.interface, vip.address, vip.prefix_length) in configured}
