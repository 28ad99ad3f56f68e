"""The failover's network side on the host kernel: virtual IPs, their announcement, the
in-use probe, the ping node and the reset of clients' connections, between namespaces on
one Ethernet segment.

Nodes a and b and a ping node p (which also plays the client whose neighbour cache must
follow the address) are plugged into one bridge, in IPv4 and IPv6. The held portal of a
planned switchover is real nftables in a's namespace.
"""

import json
import sys
import textwrap
import time

import pytest

from tests.support.netns import HeldConnection, Namespace, Switch, ip

pytestmark = pytest.mark.netns

ADDRESSES = {"a": ("10.236.0.1", "fd00:236::1"), "b": ("10.236.0.2", "fd00:236::2"), "p": ("10.236.0.9", "fd00:236::9")}
VIPS = ("10.236.0.100/24", "fd00:236::100/64")

CALL = textwrap.dedent(
    """
    import json, sys
    from applianced.failover import addresses, announce, pingnode, tickle
    function, interface, text = sys.argv[1], sys.argv[2], sys.argv[3]
    if function == "reaches":
        print(json.dumps(pingnode.reaches(text, interface, timeout=0.5)))
    elif function == "established":
        print(json.dumps([c.__dict__ for c in tickle.established([text])]))
    elif function == "reset":
        print(json.dumps(tickle.reset([tickle.Connection(**c) for c in json.loads(text)])))
    else:
        vip = addresses.VirtualAddress.parse(interface, text)
        module = {"add": addresses, "remove": addresses, "in_use": announce, "announce": announce}[function]
        print(json.dumps(getattr(module, function)(vip)))
    """
)


@pytest.fixture(scope="module")
def segment():
    switch = Switch("fo-sw")
    hosts = {name: Namespace(f"fo-{name}") for name in ADDRESSES}
    try:
        ports = {}
        for name, host in hosts.items():
            v4, v6 = ADDRESSES[name]
            ports[name] = switch.plug(host, "data", [f"{v4}/24", f"{v6}/64"])
        yield switch, hosts, ports
    finally:
        for host in hosts.values():
            host.delete()
        switch.delete()


def call(host: Namespace, function: str, text: str, interface: str = "data"):
    done = host.run(sys.executable, "-c", CALL, function, interface, text)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def mac(host: Namespace) -> str:
    return json.loads(ip("-j", "link", "show", "data", netns=host.name))[0]["address"]


def neighbour(host: Namespace, address: str) -> str | None:
    entries = json.loads(ip("-j", "neigh", "show", "to", address, "dev", "data", netns=host.name) or "[]")
    return entries[0].get("lladdr") if entries else None


@pytest.mark.parametrize("vip", VIPS)
def test_a_virtual_ip_moves_and_the_client_follows_the_announcement(segment, vip):
    _, hosts, _ = segment
    a, b, client = hosts["a"], hosts["b"], hosts["p"]
    address = vip.split("/")[0]
    call(a, "add", vip)
    call(a, "add", vip)  # idempotent
    assert call(client, "reaches", address) is not None
    assert neighbour(client, address) == mac(a)
    # b asks before it takes the address: a still answers for it, with its MAC.
    assert call(b, "in_use", vip) == mac(a)
    call(a, "remove", vip)
    call(a, "remove", vip)  # idempotent
    assert call(b, "in_use", vip) is None
    call(b, "add", vip)
    call(b, "announce", vip)
    # The client learnt the new MAC from the announcement alone: it sent nothing since.
    assert neighbour(client, address) == mac(b)
    assert call(client, "reaches", address) is not None
    call(b, "remove", vip)


@pytest.mark.parametrize("family", (0, 1))
def test_the_ping_node_answers_only_over_a_live_data_link(segment, family):
    switch, hosts, ports = segment
    a = hosts["a"]
    target = ADDRESSES["p"][family]
    assert call(a, "reaches", target) is not None
    # Over another interface (here loopback) the ping node is not reached, whatever the routes.
    assert call(a, "reaches", target, interface="lo") is None
    # The ping node's cable pulled at the switch.
    ip("link", "set", ports["p"], "down", netns=switch.name)
    try:
        assert call(a, "reaches", target) is None
    finally:
        ip("link", "set", ports["p"], "up", netns=switch.name)


@pytest.mark.parametrize("vip", VIPS)
def test_a_tickle_resets_the_connection_of_a_client_whose_server_died(segment, vip):
    switch, hosts, ports = segment
    a, b, client = hosts["a"], hosts["b"], hosts["p"]
    address = vip.split("/")[0]
    call(a, "add", vip)
    held = HeldConnection(a, client, address, 3260)
    try:
        # What the active node's beat carries: the client's connection, as a's kernel has it.
        (connection,) = call(a, "established", address)
        client_address = ADDRESSES["p"][":" in address]
        assert connection == {
            "address": address,
            "port": 3260,
            "client": client_address,
            "client_port": held.client_port,
        }
        # a dies off the network with its socket; b takes the address over.
        ip("link", "set", ports["a"], "down", netns=switch.name)
        call(b, "add", vip)
        call(b, "announce", vip)
        time.sleep(1)
        assert not held.ended()  # the client has noticed nothing
        assert call(b, "reset", json.dumps([connection])) == 1
        assert held.outcome(timeout=5) == "reset"
    finally:
        held.close()
        ip("link", "set", ports["a"], "up", netns=switch.name)
        call(a, "remove", vip)
        call(b, "remove", vip)


HOLD = textwrap.dedent(
    """
    import sys
    from applianced.iscsi.firewall import NftFirewall, held_ruleset
    rules = held_ruleset([(sys.argv[1], int(sys.argv[2]))] if len(sys.argv) > 2 else [])
    NftFirewall().hold(rules)
    NftFirewall().hold(rules)  # again, as a daemon repeating itself would: the same table
    """
)
CONNECT = textwrap.dedent(
    """
    import socket, sys, time
    started = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()
        print("open")
    except ConnectionRefusedError:
        print(f"refused {time.monotonic() - started:.1f}")
    except TimeoutError:
        print("timeout")
    """
)


# Not 3260: the tickle test's sockets there may linger.
PORT = 3262


@pytest.mark.parametrize("vip", VIPS)
def test_a_held_portal_silences_its_sessions_and_refuses_new_ones(segment, vip):
    """A switchover holds the VIPs' portals before the targets close their sessions: the
    client must see no close (the new active node resets it once it serves), and a new
    connection must be refused at once, not left to the SYN's backing-off retries."""
    _, hosts, _ = segment
    a, client = hosts["a"], hosts["p"]
    address = vip.split("/")[0]
    call(a, "add", vip)
    held = HeldConnection(a, client, address, PORT, patience=3)
    try:
        done = a.run(sys.executable, "-c", HOLD, address, str(PORT))
        assert done.returncode == 0, done.stderr
        listed = a.run("nft", "list", "ruleset").stdout
        assert listed.count("table inet applianced-held") == 1, listed
        assert listed.count("held for a switchover") == 2, listed  # its rules in and out, once
        held.server_closes()
        assert held.outcome(timeout=10) == "timeout", "the client saw the close"
        outcome = client.run(sys.executable, "-c", CONNECT, address, str(PORT)).stdout.split()
        # Refused by the first SYN's answer (over IPv6 on the host's kernel: its first
        # retransmission's, 1 s in), not after the SYN's doubling retries.
        assert outcome[0] == "refused" and float(outcome[1]) < 2.0, outcome
        # Released: the table goes.
        done = a.run(sys.executable, "-c", HOLD)
        assert done.returncode == 0, done.stderr
        assert a.run("nft", "list", "ruleset").stdout == ""
    finally:
        held.close()
        a.run(sys.executable, "-c", HOLD)
        call(a, "remove", vip)
