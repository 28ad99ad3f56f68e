"""Network namespaces made by a test, and veth links between them.

Every address a test uses lives inside namespaces created here, never on the machine's
real interfaces; deleting the namespaces removes the links with them.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

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


_SERVER = textwrap.dedent(
    """
    import socket, sys
    address, port = sys.argv[1], int(sys.argv[2])
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, port))
    listener.listen()
    print("ready", flush=True)
    connection, _ = listener.accept()
    print("accepted", flush=True)
    sys.stdin.read()
    """
)
_CLIENT = textwrap.dedent(
    """
    import socket, sys
    connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(connection.getsockname()[1], flush=True)
    connection.settimeout(float(sys.argv[3]))
    try:
        print("data" if connection.recv(1) else "closed")
    except ConnectionResetError:
        print("reset")
    except TimeoutError:
        print("timeout")
    """
)


class HeldConnection:
    """A TCP connection from ``client`` to ``address`` on ``server`` that nobody uses: the
    client waits up to ``patience`` seconds for the server to send, close or reset it."""

    def __init__(self, server: Namespace, client: Namespace, address: str, port: int, patience: float = 60) -> None:
        command = [sys.executable, "-c", _SERVER, address, str(port)]
        self._server = subprocess.Popen(
            [*server.exec_prefix, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._client: subprocess.Popen[str] | None = None
        try:
            assert self._server.stdout.readline().strip() == "ready"
            command = [sys.executable, "-c", _CLIENT, address, str(port), str(patience)]
            self._client = subprocess.Popen([*client.exec_prefix, *command], stdout=subprocess.PIPE, text=True)
            self.client_port = int(self._client.stdout.readline())
            assert self._server.stdout.readline().strip() == "accepted"
        except BaseException:
            self.close()
            raise

    def server_closes(self) -> None:
        """The server closes its end (as LIO does when a target is disabled) and exits."""
        assert self._server.stdin is not None
        self._server.stdin.close()
        self._server.wait(timeout=10)

    def ended(self) -> bool:
        assert self._client is not None
        return self._client.poll() is not None

    def outcome(self, timeout: float) -> str:
        """How the client's wait ended: data, closed, reset or timeout."""
        assert self._client is not None
        return self._client.communicate(timeout=timeout)[0].strip()

    def close(self) -> None:
        for process in (self._server, self._client):
            if process is not None:
                process.kill()
                process.wait()


_CAPTURE = textwrap.dedent(
    """
    import json, socket, struct, sys, time
    interface, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    # Every protocol: a handler for IPv4 alone would not see the frames of a bridge port.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((interface, 0))
    sock.settimeout(0.2)
    payloads, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            frame, meta = sock.recvfrom(65535)
        except TimeoutError:
            continue
        if meta[2] == socket.PACKET_OUTGOING:
            continue
        if frame[12:14] != bytes([8, 0]):
            continue
        packet = frame[14:]
        header = (packet[0] & 15) * 4
        if packet[9] == 17 and struct.unpack("!H", packet[header + 2 : header + 4])[0] == port:
            payloads.append(packet[header + 8 :].hex())
    print(json.dumps(payloads))
    """
)
_SEND = textwrap.dedent(
    """
    import json, socket, sys
    source, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for datagram in json.load(sys.stdin):
            sock.sendto(bytes.fromhex(datagram), (address, port))
    """
)


def capture_datagrams(namespace: Namespace, interface: str, port: int, seconds: float) -> list[bytes]:
    """The UDP payloads to ``port`` that arrive on ``interface`` within ``seconds``: what
    an attacker on that wire records."""
    done = namespace.run(sys.executable, "-c", _CAPTURE, interface, str(port), str(seconds))
    assert done.returncode == 0, done.stderr
    return [bytes.fromhex(payload) for payload in json.loads(done.stdout)]


def send_datagrams(namespace: Namespace, source: str, address: str, port: int, datagrams: list[bytes]) -> None:
    """Send each of ``datagrams`` from ``source`` (an address in ``namespace``) to ``address:port``."""
    command = [*namespace.exec_prefix, sys.executable, "-c", _SEND, source, address, str(port)]
    listing = json.dumps([datagram.hex() for datagram in datagrams])
    done = subprocess.run(command, input=listing, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
