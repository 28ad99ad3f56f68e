"""Which client connections a takeover resets: read from the kernel's socket tables.

(The reset itself, between namespaces, is in tests/netns/test_failover_network.py.)
"""

import socket

import pytest

from applianced.failover import tickle


@pytest.fixture(params=[("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)], ids=["ipv4", "ipv6"])
def connection(request):
    address, family = request.param
    listener = socket.socket(family)
    listener.bind((address, 0))  # fails, rather than skips, on a machine without IPv6 loopback
    listener.listen()
    client = socket.create_connection((address, listener.getsockname()[1]))
    accepted, _ = listener.accept()
    yield address, listener.getsockname()[1], client.getsockname()[1]
    for sock in (client, accepted, listener):
        sock.close()


def test_the_established_connections_to_an_address_are_listed_with_their_ports(connection):
    address, port, client_port = connection
    found = tickle.established([address])
    # The accepted end, whose local port is the service's (over loopback the client's end
    # has the address too); the listening socket is no connection.
    assert tickle.Connection(address, port, address, client_port) in found
    assert tickle.Connection(address, client_port, address, port) in found
    assert not any(c.client_port == 0 for c in found)


def test_connections_to_other_addresses_are_left_out(connection):
    address, _, _ = connection
    other = "10.255.255.1" if "." in address else "fd00:255::1"
    assert tickle.established([other]) == ()
