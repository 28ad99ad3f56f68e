"""What the node's network looks like, read through netlink with pyroute2.

A portal can only listen on an address that is configured on one of the node's interfaces
(or on the wildcard address); LIO would otherwise fail with a bare "Cannot assign requested
address". Later the failover engine moves virtual addresses with the same library.
"""

from __future__ import annotations

import ipaddress


def local_addresses() -> set[str]:
    """Every IPv4 and IPv6 address configured on this network namespace, canonical form."""
    # Imported here: pyroute2 is half of the daemon's import time (seconds in a TCG guest)
    # and only portal changes need it, so it must not delay every daemon start.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {
            str(ipaddress.ip_address(message.get("IFA_ADDRESS")))
            for message in ipr.get_addr()
            if message.get("IFA_ADDRESS")
        }


def is_wildcard(address: str) -> bool:
    return ipaddress.ip_address(address).is_unspecified
