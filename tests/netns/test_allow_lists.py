"""Allow-lists enforced by real nftables rules, inside test-made network namespaces.

The daemon (in-memory LIO, real firewall) runs in a "node" namespace joined by veth
pairs to two "initiator" namespaces, each on its own subnet and with its own MAC. A
stand-in TCP listener sits on the portals (LIO itself needs a VM: tests/vm), and probes
from the initiators connect with a chosen source address. Every rule lives in the node's
namespace, which is deleted at the end: the machine's own firewall is never touched.
"""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support.daemon import Daemon
from tests.support.netns import Namespace, link
from tests.support.run_daemon import FIREWALL_ENV, HOSTS_ENV

pytestmark = pytest.mark.netns

NODE1, PEER1, PEER1_OTHER = "10.232.1.1", "10.232.1.2", "10.232.1.3"
NODE2, PEER2 = "10.232.2.1", "10.232.2.2"
NODE1_V6, PEER1_V6 = "fd00:232:1::1", "fd00:232:1::2"
NODE2_V6, PEER2_V6 = "fd00:232:2::1", "fd00:232:2::2"
MAC1, MAC2 = "52:54:00:23:20:01", "52:54:00:23:20:02"
NO_CHANGE = "reconciled at start-up with 0 change(s)"

# t1: 0.0.0.0:3260 and the dual-stack [::]:3263; t2 (never restricted): 10.232.1.1:3261.
LISTEN = [("0.0.0.0", 3260), ("::", 3263), (NODE1, 3261)]
# name -> (initiator, source, destination, port)
PROBES = {
    "peer1 to 0.0.0.0": ("peer1", PEER1, NODE1, 3260),
    "peer1 other address to 0.0.0.0": ("peer1", PEER1_OTHER, NODE1, 3260),
    "peer2 to 0.0.0.0": ("peer2", PEER2, NODE2, 3260),
    "peer1 v6 to ::": ("peer1", PEER1_V6, NODE1_V6, 3263),
    "peer2 v6 to ::": ("peer2", PEER2_V6, NODE2_V6, 3263),
    "peer1 v4 to ::": ("peer1", PEER1, NODE1, 3263),
    "peer2 v4 to ::": ("peer2", PEER2, NODE2, 3263),
    "peer1 other address to t2": ("peer1", PEER1_OTHER, NODE1, 3261),
}

LISTENER = textwrap.dedent(
    """
    import json, select, socket, sys
    sockets = []
    for address, port in json.loads(sys.argv[1]):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack, as LIO's :: is
        s.bind((address, port))
        s.listen(16)
        sockets.append(s)
    print("ready", flush=True)
    while True:
        for s in select.select(sockets, [], [])[0]:
            s.accept()[0].close()
    """
)

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    results = {}
    for name, (source, address, port) in json.loads(sys.argv[1]).items():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.bind((source, 0))
            try:
                s.connect((address, port))
                results[name] = "open"
            except ConnectionRefusedError:
                results[name] = "refused"
            except OSError as exc:
                results[name] = f"failed: {exc}"
    print(json.dumps(results))
    """
)


@pytest.fixture
def lab(bus, tmp_path):
    node, peer1, peer2 = Namespace("node"), Namespace("init1"), Namespace("init2")
    listener = None
    daemon = None
    try:
        link(node, [f"{NODE1}/24", f"{NODE1_V6}/64"], peer1, [f"{PEER1}/24", f"{PEER1_OTHER}/24", f"{PEER1_V6}/64"],
             names=("to-init1", "veth-b"), b_mac=MAC1)  # fmt: skip
        link(node, [f"{NODE2}/24", f"{NODE2_V6}/64"], peer2, [f"{PEER2}/24", f"{PEER2_V6}/64"],
             names=("to-init2", "veth-b"), b_mac=MAC2)  # fmt: skip
        listener = subprocess.Popen(
            [*node.exec_prefix, sys.executable, "-c", LISTENER, json.dumps(LISTEN)], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout.readline().strip() == "ready"
        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps({"initiator2.test": [PEER2, PEER2_V6]}))
        daemon = Daemon(
            bus.address, tmp_path, extra_env={FIREWALL_ENV: "nft", HOSTS_ENV: str(hosts)}, exec_prefix=node.exec_prefix
        )
        daemon.start()
        for args in (
            ("target", "create", "t1"),
            ("target", "create", "t2"),
            ("portal", "create", "0.0.0.0", "--target", "t1"),
            ("portal", "create", "::", "--port", "3263", "--target", "t1"),
            ("portal", "create", NODE1, "--port", "3261", "--target", "t2"),
        ):
            assert daemon.cli(*args).returncode == 0, args
        yield {"node": node, "peer1": peer1, "peer2": peer2, "daemon": daemon, "hosts": hosts}
    finally:
        if daemon and daemon.process:
            daemon.stop()
        if listener:
            listener.kill()
            listener.wait()
        for namespace in (node, peer1, peer2):
            namespace.delete()


def probe(lab) -> dict[str, str]:
    results = {}
    for peer in ("peer1", "peer2"):
        mine = {name: (src, dst, port) for name, (who, src, dst, port) in PROBES.items() if who == peer}
        done = lab[peer].run(sys.executable, "-c", PROBE, json.dumps(mine))
        assert done.returncode == 0, done.stderr
        results.update(json.loads(done.stdout))
    return results


def expect(open_: set[str]) -> dict[str, str]:
    return {name: "open" if name in open_ else "refused" for name in PROBES}


def ruleset(lab) -> str:
    """The node's whole rule set with handles: a table that was replaced gets new ones."""
    done = lab["node"].run("nft", "-a", "list", "ruleset")
    assert done.returncode == 0, done.stderr
    return done.stdout


def allow(lab, *sources):
    done = lab["daemon"].cli("target", "allow", "t1", *sources)
    assert done.returncode == 0, done.stderr


def reload(daemon) -> None:
    marker = daemon.log_text().count("state file reloaded")
    daemon.signal(1)  # SIGHUP
    deadline = time.monotonic() + 30
    while daemon.log_text().count("state file reloaded") == marker:
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)


def test_allow_lists_admit_only_listed_sources(lab):
    everyone = set(PROBES)
    assert probe(lab) == expect(everyone)
    assert ruleset(lab) == "", "no allow-list: applianced adds no table"

    # By address and network: peer1's second address and peer2 get a TCP reset, on both
    # families and on both wildcard portals; t2's portal stays open to all.
    allow(lab, PEER1, "fd00:232:1::/64")
    assert probe(lab) == expect({"peer1 to 0.0.0.0", "peer1 v6 to ::", "peer1 v4 to ::", "peer1 other address to t2"})

    # By MAC: peer1's NIC, whatever address it uses.
    allow(lab, MAC1)
    assert probe(lab) == expect(everyone - {"peer2 to 0.0.0.0", "peer2 v6 to ::", "peer2 v4 to ::"})

    # By DNS name, resolved now; a name that does not resolve is refused and changes nothing.
    allow(lab, "initiator2.test")
    peer2_only = {"peer2 to 0.0.0.0", "peer2 v6 to ::", "peer2 v4 to ::", "peer1 other address to t2"}
    assert probe(lab) == expect(peer2_only)
    rules = ruleset(lab)
    refused = lab["daemon"].cli("target", "allow", "t1", "nowhere.test")
    assert (refused.returncode, "DNS name nowhere.test does not resolve" in refused.stderr) == (5, True)
    assert ruleset(lab) == rules
    # A portal that would serve t1 and t2 alike cannot filter for t1 alone.
    shared = lab["daemon"].cli("portal", "create", NODE2, "--port", "3264")
    assert (shared.returncode, "serves every target" in shared.stderr) == (5, True)
    assert ruleset(lab) == rules

    # Re-applying changes nothing: a reload and a restart leave the very same table.
    daemon = lab["daemon"]
    replaced, quiet_starts = daemon.log_text().count("firewall rules replaced"), daemon.log_text().count(NO_CHANGE)
    reload(daemon)
    assert ruleset(lab) == rules
    daemon.stop()
    daemon.start()
    assert ruleset(lab) == rules
    assert daemon.log_text().count(NO_CHANGE) == quiet_starts + 1
    assert daemon.log_text().count("firewall rules replaced") == replaced

    # The name is resolved again at reload: it now stands for peer1's first address.
    lab["hosts"].write_text(json.dumps({"initiator2.test": [PEER1]}))
    reload(lab["daemon"])
    assert probe(lab) == expect({"peer1 to 0.0.0.0", "peer1 v4 to ::", "peer1 other address to t2"})

    allow(lab, "--clear")
    assert probe(lab) == expect(everyone)
    assert ruleset(lab) == ""


ROUND_TRIP = textwrap.dedent(
    """
    import json
    from applianced.iscsi import firewall
    from applianced.state import Config, Portal, Target

    portals = (Portal("::", 3260, ("t1",)), Portal("10.0.0.1", 3260, ("t1",)), Portal("0.0.0.0", 3261, ("t1",)),
               Portal("fd00::1", 3260, ("t1",)))
    resolved = {"c1.example": frozenset({"10.0.0.77", "10.9.0.1", "fd01::1"}), "gone.example": frozenset()}
    lists = [("10.0.0.0/24", "10.0.0.9", "10.0.1.0/24", "fd00::/64", "52:54:00:00:00:01", "c1.example"),
             ("c1.example",), ("52:54:00:00:00:01",), ("10.0.0.1",), ("fd00::1",), ("0.0.0.0/0", "::/0"),
             ("gone.example",), ()]
    nft = firewall.NftFirewall()
    results = []
    for sources in lists:
        config = Config("n", targets={"t1": Target("t1", "iqn.2003-01.org.example:t1", allowed_sources=sources)},
                        portals=portals)
        wanted = firewall.ruleset(firewall.filters(config, resolved).values())
        results.append([nft.apply(wanted), nft.apply(wanted), nft.observe() == wanted])
    print(json.dumps(results))
    """
)


def test_every_kind_of_rule_reads_back_equal():
    """The table nft lists is compared with the rendered one: for each kind of portal and
    source they must be equal, or every apply would replace the table again."""
    node = Namespace("nft")
    try:
        done = node.run(sys.executable, "-c", ROUND_TRIP)
        assert done.returncode == 0, done.stderr
        # Each list: replaced once, then found equal and left alone; the last (empty) one
        # removes the table.
        assert json.loads(done.stdout) == [[True, False, True]] * 8
        assert node.run("nft", "list", "ruleset").stdout == ""
    finally:
        node.delete()
