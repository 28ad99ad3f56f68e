"""Network namespaces made by a test, and veth links between them.

Every address a test uses lives inside namespaces created here, never on the machine's
real interfaces; deleting the namespaces removes the links with them.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_counter = itertools.count()


def ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


class Namespace:
    """A network namespace with its loopback up; ``exec_prefix`` runs commands inside it."""

    def __init__(self, label: str) -> None:
        self.name = f"appl-{label}-{os.getpid()}-{next(_counter)}"
        ip("netns", "add", self.name)
        ip("link", "set", "lo", "up", netns=self.name)

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.exec_prefix, *command], capture_output=True, text=True, timeout=60)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)


def link(
    a: Namespace,
    a_addresses: list[str],
    b: Namespace,
    b_addresses: list[str],
    names: tuple[str, str] = ("veth-a", "veth-b"),
    b_mac: str | None = None,
) -> tuple[str, str]:
    """Join ``a`` and ``b`` with a veth pair, give each end its addresses (CIDR), bring both up.

    ``names`` are the two interfaces' names; ``b_mac`` fixes the MAC of ``b``'s end.
    """
    a_if, b_if = names
    mac = ["address", b_mac] if b_mac else []
    ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, *mac, "netns", b.name, netns=a.name)
    for namespace, interface, addresses in ((a, a_if, a_addresses), (b, b_if, b_addresses)):
        _configure(namespace, interface, addresses)
    return a_if, b_if


def _configure(namespace: Namespace, interface: str, addresses: list[str]) -> None:
    """Give ``interface`` its addresses (CIDR) and bring it up."""
    for address in addresses:
        # nodad: the IPv6 address is usable at once instead of after duplicate detection.
        extra = ["nodad"] if ":" in address else []
        ip("addr", "add", address, "dev", interface, *extra, netns=namespace.name)
    ip("link", "set", interface, "up", netns=namespace.name)


class Switch(Namespace):
    """A namespace holding one bridge: hosts plugged into it share an Ethernet segment."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        ip("link", "add", "br0", "type", "bridge", netns=self.name)
        # Ports forward at once: no spanning tree, no learning delay.
        ip("link", "set", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0", netns=self.name)
        ip("link", "set", "br0", "up", netns=self.name)
        self._ports = itertools.count()

    def plug(self, host: Namespace, interface: str, addresses: list[str]) -> str:
        """A veth from ``host`` (named ``interface`` there) to a bridge port; returns the port."""
        port = f"port{next(self._ports)}"
        ip("link", "add", port, "type", "veth", "peer", "name", interface, "netns", host.name, netns=self.name)
        ip("link", "set", port, "master", "br0", "up", netns=self.name)
        _configure(host, interface, addresses)
        return port
