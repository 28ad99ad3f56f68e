"""Replicated volumes between two real daemons, through appliancectl, in test-made namespaces.

Two daemons (each on a private bus of its own, with the in-memory kernel and the data
path's stand-in, tests/support/fake_datapath.py) in namespaces of their own, joined by a
main path and an auxiliary one, are paired. Proven here: the copy is made, locked and
given the source's identity; states and their numbers; each operation's effect on both
nodes; refusals are named and change nothing on either node; a cut link pauses the
mirror and its return resumes it; a restart adopts the mirror; split brain is detected,
refused and recovered. What the kernel does (md, device-mapper, NBD, the data on both
disks) is proven in tests/vm/test_replication.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from applianced.bus import paths
from applianced.constants import MIRROR_INTERFACE
from tests.dbus.test_api import DOCUMENTED, dbus, interfaces_of
from tests.support.daemon import Daemon
from tests.support.netns import Namespace, ip, link
from tests.support.pair import PairedDaemons, wait

pytestmark = pytest.mark.netns

KEY = "replication-pair-key-of-the-netns-tier-0123"
MAIN = {"a": "10.234.1.1", "b": "10.234.1.2"}
AUX = {"a": "10.234.2.1", "b": "10.234.2.2"}
LINKS = {"a": ("repl-a", "raux-a"), "b": ("repl-b", "raux-b")}


class Pair:
    def __init__(self, root: Path) -> None:
        self.namespaces = {name: Namespace(f"repl-{name}") for name in MAIN}
        a, b = self.namespaces["a"], self.namespaces["b"]
        link(a, [f"{MAIN['a']}/24"], b, [f"{MAIN['b']}/24"], names=(LINKS["a"][0], LINKS["b"][0]))
        link(a, [f"{AUX['a']}/24"], b, [f"{AUX['b']}/24"], names=(LINKS["a"][1], LINKS["b"][1]))
        self.daemons = PairedDaemons(root, self.namespaces, MAIN, AUX, KEY)
        self.nodes = self.daemons.nodes

    @property
    def a(self) -> Daemon:
        return self.nodes["a"]

    @property
    def b(self) -> Daemon:
        return self.nodes["b"]

    wait = staticmethod(wait)

    def cut(self, up: bool = False) -> None:
        """Pull (or plug back) both cables of node b."""
        for interface in LINKS["b"]:
            ip("link", "set", interface, "up" if up else "down", netns=self.namespaces["b"].name)

    def files(self) -> dict[str, bytes]:
        """Everything either node keeps: what a refused request must leave as it was."""
        found = {}
        for name, node in self.nodes.items():
            for path in sorted(node.state_dir.parent.rglob("*")):
                if path.is_file() and path.suffix in (".json", ".img") and "initiators" not in path.name:
                    found[f"{name}:{path.relative_to(node.state_dir.parent)}"] = path.read_bytes()
        return found

    def close(self) -> None:
        self.daemons.close()
        for namespace in self.namespaces.values():
            namespace.delete()


@pytest.fixture
def pair(tmp_path):
    made = Pair(tmp_path)
    yield made
    made.close()


def state(node: Daemon, disk: str = "d1") -> int:
    result = node.cli("mirror", "state", disk)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def shown(node: Daemon, disk: str = "d1") -> dict:
    result = node.cli("--json", "mirror", "show", disk)
    assert result.returncode == 0, result.stderr
    return result.json()


def disk(node: Daemon, name: str = "d1") -> dict:
    return next(d for d in node.cli("--json", "disk", "list").json() if d["name"] == name)


def mirrored(pair: Pair, configured: bool = False) -> None:
    if not configured:
        pair.a.configure_first_slice()
    created = pair.a.cli("mirror", "create", "d1", "sync")
    assert created.returncode == 0, created.stderr
    pair.wait(lambda: state(pair.a) == 1)


def test_a_mirror_makes_a_locked_copy_with_the_source_identity(pair):
    mirrored(pair)
    source, copy = shown(pair.a), shown(pair.b)
    assert (source["role"], source["mode"], source["target_address"]) == ("source", "sync", MAIN["b"])
    assert (copy["role"], copy["source_address"], copy["port"]) == ("target", MAIN["a"], source["port"])
    assert copy["generation"]["current"] == source["generation"]["current"]
    assert disk(pair.b)["serial"] == disk(pair.a)["serial"]
    assert (disk(pair.b)["status"], disk(pair.a)["status"]) == ("locked", "online")
    # The copy is not served by b's LIO; only a's address may reach its export.
    kernel_b = (pair.b.state_dir.parent / "kernel.json").read_text()
    assert '"d1"' not in kernel_b
    firewall_b = (pair.b.state_dir.parent / "firewall.json").read_text()
    assert MAIN["a"] in firewall_b and "replication export" in firewall_b
    # The live Mirror object is the documented one.
    (xml_text,) = dbus(pair.a.bus_address, paths.mirror_path("d1"), "org.freedesktop.DBus.Introspectable", "Introspect")
    assert interfaces_of(xml_text)[MIRROR_INTERFACE] == interfaces_of(DOCUMENTED.read_text())[MIRROR_INTERFACE]
    listed = pair.a.cli("mirror", "list")
    assert "source" in listed.stdout and "1 mirroring" in listed.stdout
    # GETVOLUMEDRVSTATE: a bare number, 0 for a disk without a mirror.
    assert pair.a.cli("mirror", "state", "nothing-here").stdout.strip() == "0"


def refused(pair: Pair, node: Daemon, args: tuple[str, ...], code: int, text: str) -> None:
    before = pair.files()
    result = node.cli(*args)
    assert (result.returncode, text in result.stderr) == (code, True), (args, result.stderr)
    assert pair.files() == before, f"{args} changed something"


def test_bad_requests_are_named_and_change_nothing_on_either_node(pair):
    pair.a.configure_first_slice()
    pair.b.cli("disk", "create", "small", "16M")
    pair.b.cli("disk", "create", "used", "64M")
    pair.b.cli("target", "create", "tb")
    pair.b.cli("lun", "add", "tb", "used")
    refused(pair, pair.a, ("mirror", "create", "nothing", "sync"), 3, "does not exist")
    refused(pair, pair.a, ("mirror", "create", "d1", "sync", "--peer-disk", "absent"), 3, "has no disk 'absent'")
    refused(pair, pair.a, ("mirror", "create", "d1", "sync", "--peer-disk", "small"), 5, "is smaller")
    refused(pair, pair.a, ("mirror", "create", "d1", "sync", "--peer-disk", "used"), 6, "exported by tb")
    refused(pair, pair.a, ("mirror", "create", "d1", "sync", "--region", "3000"), 5, "region size")
    assert pair.a.cli("mirror", "create", "d1", "synchronous").returncode == 2  # a mode typo
    refused(pair, pair.a, ("mirror", "pause", "d1"), 3, "is not mirrored")
    mirrored(pair, configured=True)
    refused(pair, pair.a, ("mirror", "create", "d1", "sync"), 4, "mirrored already")
    refused(pair, pair.a, ("disk", "delete", "d1"), 6, "mirrored to the peer node")
    refused(pair, pair.a, ("disk", "extend", "d1", "128M"), 6, "mirrored to the peer node")
    refused(pair, pair.b, ("mirror", "pause", "d1"), 7, "holds the copy")
    refused(pair, pair.b, ("mirror", "delete", "d1"), 7, "delete the mirror on the source")
    refused(pair, pair.a, ("mirror", "tune", "d1", "--low-water", "30000"), 5, "must be below")
    refused(pair, pair.a, ("mirror", "endpoints", "d1", "192.0.2.1", MAIN["b"]), 5, "not an address of this node")
    pair.a.cli("mirror", "pause", "d1")
    refused(pair, pair.a, ("mirror", "switchover", "d1"), 6, "only a mirroring copy can take over")
    # The peer is down: nothing happens on this node either.
    pair.b.stop()
    refused(pair, pair.a, ("mirror", "continue", "d1"), 13, "did not answer")
    refused(pair, pair.a, ("mirror", "delete", "d1"), 13, "did not answer")
    pair.b.start()


def test_an_unpaired_node_cannot_mirror(pair):
    pair.a.configure_first_slice()
    pair.a.cli("pair", "delete")
    refused(pair, pair.a, ("mirror", "create", "d1", "sync"), 7, "not paired")


def test_pause_continue_break_resync_mode_and_tunables(pair):
    mirrored(pair)
    assert pair.a.cli("mirror", "pause", "d1").returncode == 0
    assert state(pair.a) == 4 and shown(pair.a)["generation"]["bitmap"], "writes from now on are the peer's gap"
    assert pair.a.cli("mirror", "continue", "d1").returncode == 0
    pair.wait(lambda: state(pair.a) == 1)
    assert shown(pair.a)["generation"]["current"] == shown(pair.b)["generation"]["current"]
    assert pair.a.cli("mirror", "break", "d1").returncode == 0
    assert state(pair.a) == 3
    pair.a.cli("mirror", "continue", "d1")
    pair.wait(lambda: state(pair.a) == 1)
    assert pair.a.cli("mirror", "resync", "d1").returncode == 0
    pair.wait(lambda: state(pair.a) == 1)
    assert pair.a.cli("mirror", "mode", "d1", "async").returncode == 0
    assert (shown(pair.a)["mode"], shown(pair.b)["mode"]) == ("async", "async")
    assert pair.a.cli("mirror", "tune", "d1", "--high-water", "500", "--throttle", "80000").returncode == 0
    tunables = shown(pair.a)["tunables"]
    assert (tunables["high_water"], tunables["low_water"], tunables["throttle"]) == (500, 150, 80000)
    assert shown(pair.b)["tunables"] == tunables
    # The throttle is a rate on the source's traffic to the copy's export.
    throttles = json.loads((pair.a.state_dir.parent / "datapath.json").read_text())["throttles"]
    assert throttles == [[MAIN["b"], shown(pair.a)["port"], 80000]]
    counters = shown(pair.a)["counters"]
    assert (counters["QueueHighWater"], counters["Type"], counters["State"]) == (500, "async", 1)


def test_a_cut_link_pauses_and_its_return_resumes_by_itself(pair):
    mirrored(pair)
    pair.cut()
    pair.wait(lambda: state(pair.a) == 4)
    assert shown(pair.a)["reason"] in ("the peer link is down", "the peer's leg failed")
    assert shown(pair.a)["generation"]["bitmap"], "the source writes alone"
    pair.cut(up=True)
    pair.wait(lambda: state(pair.a) == 1)
    assert shown(pair.a)["counters"]["Reconnects"] == 1
    assert shown(pair.b)["generation"]["current"] == shown(pair.a)["generation"]["current"]


def test_endpoints_move_the_mirror_and_the_copys_export_rule_to_the_other_path(pair):
    mirrored(pair)
    assert pair.a.cli("mirror", "endpoints", "d1", AUX["a"], AUX["b"]).returncode == 0
    pair.wait(lambda: state(pair.a) == 1)
    source, copy = shown(pair.a), shown(pair.b)
    assert (source["source_address"], source["target_address"]) == (AUX["a"], AUX["b"])
    assert (copy["source_address"], copy["target_address"]) == (AUX["a"], AUX["b"])
    # The copy's node reconciled for the new addresses: its export admits a's other one.
    firewall_b = (pair.b.state_dir.parent / "firewall.json").read_text()
    assert AUX["a"] in firewall_b and MAIN["a"] not in firewall_b
    assert copy["generation"]["current"] == source["generation"]["current"]


def test_grow_makes_both_halves_larger(pair):
    mirrored(pair)
    refused(pair, pair.a, ("mirror", "grow", "d1", "32M"), 5, "grows by whole 4 KiB blocks")
    assert pair.a.cli("mirror", "grow", "d1", "128M").returncode == 0
    pair.wait(lambda: state(pair.a) == 1)
    assert (disk(pair.a)["size"], disk(pair.b)["size"], shown(pair.b)["size"]) == (128 << 20,) * 3


def test_a_daemon_restart_adopts_the_mirror_on_both_nodes(pair):
    mirrored(pair)
    for node in (pair.a, pair.b):
        node.stop()
        node.start()
    pair.wait(lambda: state(pair.a) == 1)
    assert shown(pair.b)["role"] == "target"


def test_a_restart_adopts_the_mirrors_it_can_and_says_why_not_the_others(pair):
    mirrored(pair)
    assert pair.a.cli("disk", "create", "d2", "16M").returncode == 0
    assert pair.a.cli("mirror", "create", "d2", "sync").returncode == 0
    pair.wait(lambda: state(pair.a, "d2") == 1)
    pair.a.stop()
    # While the daemon was down, a's half of d2 lost its md superblock.
    store = pair.a.state_dir.parent / "datapath.json"
    kept = json.loads(store.read_text())
    kept["d2"]["metadata"] = False
    store.write_text(json.dumps(kept))
    pair.a.start()
    assert shown(pair.a, "d2")["reason"].startswith("the data path could not be assembled: no mirror metadata")
    pair.wait(lambda: state(pair.a) == 1)
    assert shown(pair.a)["reason"] == ""


def test_delete_keeps_both_halves_and_gives_the_copy_a_serial_of_its_own(pair):
    mirrored(pair)
    serial = disk(pair.a)["serial"]
    assert pair.a.cli("mirror", "delete", "d1").returncode == 0
    assert pair.a.cli("mirror", "state", "d1").stdout.strip() == "0"
    assert disk(pair.a)["serial"] == serial and disk(pair.a)["status"] == "online"
    assert disk(pair.b)["serial"] != serial and disk(pair.b)["status"] == "online"
    assert pair.b.cli("mirror", "state", "d1").stdout.strip() == "0"


def test_an_orphaned_copy_is_released_on_its_own_node(pair):
    mirrored(pair)
    pair.a.stop()
    assert pair.b.cli("mirror", "delete", "d1", "--local-only").returncode == 0
    assert disk(pair.b)["status"] == "online"
    assert pair.b.cli("mirror", "state", "d1").stdout.strip() == "0"
    pair.a.start()


def test_switchover_swaps_the_roles_both_ways(pair):
    mirrored(pair)
    assert pair.a.cli("mirror", "switchover", "d1").returncode == 0
    pair.wait(lambda: (shown(pair.b)["role"], state(pair.b)) == ("source", 1))
    assert shown(pair.a)["role"] == "target"
    assert (disk(pair.a)["status"], disk(pair.b)["status"]) == ("locked", "online")
    assert pair.b.cli("mirror", "switchover", "d1").returncode == 0
    pair.wait(lambda: (shown(pair.a)["role"], state(pair.a)) == ("source", 1))
    assert shown(pair.b)["role"] == "target"


def test_split_brain_is_refused_and_the_chosen_loser_is_resynced(pair):
    mirrored(pair)
    pair.a.stop()
    # The copy's node takes over alone (the source is "gone"), then the source comes back.
    assert pair.b.cli("mirror", "switchover", "d1", "--force").returncode == 0
    assert shown(pair.b)["role"] == "source"
    pair.a.start()
    pair.wait(lambda: shown(pair.a)["split_brain"])
    assert state(pair.a) == 4, "never resolved silently"
    assert "split brain" in shown(pair.a)["reason"]
    assert pair.b.cli("mirror", "prepare-target", "d1").returncode == 0
    assert pair.a.cli("mirror", "continue", "d1").returncode == 0
    pair.wait(lambda: state(pair.a) == 1)
    assert shown(pair.b)["generation"]["current"] == shown(pair.a)["generation"]["current"]
