"""Portal addresses checked against the node's real interfaces, read through netlink.

The daemon runs inside a network namespace that the test builds (veth link, IPv4 and IPv6
addresses); the private bus is a path socket, which crosses network namespaces.
"""

import json
import subprocess
import sys

import pytest

from tests.support.daemon import Daemon
from tests.support.netns import Namespace, link

pytestmark = pytest.mark.netns

NODE_V4, PEER_V4 = "10.231.0.1", "10.231.0.2"
NODE_V6 = "fd00:231::1"


@pytest.fixture
def node_and_peer():
    node, peer = Namespace("node"), Namespace("peer")
    try:
        link(node, [f"{NODE_V4}/24", f"{NODE_V6}/64"], peer, [f"{PEER_V4}/24"])
        yield node, peer
    finally:
        node.delete()
        peer.delete()


def test_local_addresses_are_read_from_the_namespace(node_and_peer):
    node, _ = node_and_peer
    script = "import json, applianced.network as n; print(json.dumps(sorted(n.local_addresses())))"
    probe = node.run(sys.executable, "-c", script)
    assert probe.returncode == 0, probe.stderr
    addresses = set(json.loads(probe.stdout))
    assert {NODE_V4, NODE_V6, "127.0.0.1", "::1"} <= addresses
    assert PEER_V4 not in addresses
    # Only the link-local address the kernel gave the veth may come on top.
    assert all(a.startswith("fe80:") for a in addresses - {NODE_V4, NODE_V6, "127.0.0.1", "::1"})


def test_portals_only_on_addresses_of_this_node(node_and_peer, bus, tmp_path):
    node, peer = node_and_peer
    daemon = Daemon(bus.address, tmp_path, exec_prefix=node.exec_prefix)
    daemon.start()
    try:
        assert daemon.cli("portal", "create", NODE_V4).returncode == 0
        assert daemon.cli("portal", "create", NODE_V6, "--port", "3261").returncode == 0
        refused = daemon.cli("portal", "create", PEER_V4)
        assert refused.returncode == 5
        assert f"address {PEER_V4} is not configured on any interface of this node" in refused.stderr
        # An address added later is seen at once: the daemon reads netlink per request.
        subprocess.run(["ip", "-n", node.name, "addr", "add", "10.231.1.1/24", "dev", "veth-a"], check=True)
        assert daemon.cli("portal", "create", "10.231.1.1").returncode == 0
        listed = {(p["address"], p["port"]) for p in daemon.cli("--json", "portal", "list").json()}
        assert listed == {(NODE_V4, 3260), (NODE_V6, 3261), ("10.231.1.1", 3260)}
        # The peer is a real host on the link: the namespace plumbing is what it claims.
        assert peer.run("ping", "-c", "1", "-W", "2", NODE_V4).returncode == 0
    finally:
        daemon.stop()
