"""Source allow-lists through appliancectl and D-Bus, against the real daemon.

The daemon runs with the in-memory kernel and firewall (firewall.json beside the kernel
file holds the rule set it asked for); names resolve only through the test's hosts file.
"""

import json

import pytest

from applianced.constants import TARGET_INTERFACE
from applianced.iscsi.firewall import Ruleset
from tests.dbus.test_api import dbus
from tests.support.daemon import Daemon
from tests.support.run_daemon import HOSTS_ENV


@pytest.fixture
def node(bus, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"client1.test": ["127.0.0.21"]}))
    daemon = Daemon(bus.address, tmp_path, extra_env={HOSTS_ENV: str(hosts)})
    daemon.start()
    daemon.configure_first_slice()
    # t1 gets the portal to itself, so that it may have a list of its own.
    assert daemon.cli("portal", "delete", "127.0.0.1").returncode == 0
    assert daemon.cli("portal", "create", "127.0.0.1", "--target", "t1").returncode == 0
    yield daemon
    if daemon.process:
        daemon.stop()


def rules(daemon) -> Ruleset:
    path = daemon.kernel_file.with_name("firewall.json")
    return tuple(json.loads(path.read_text())) if path.exists() else ()


def test_allow_list_through_the_cli_and_dbus(node, bus):
    done = node.cli("target", "allow", "t1", "127.0.0.0/8", "52-54-00-AB-CD-EF", "Client1.Test", "fd00::/64")
    assert done.returncode == 0, done.stderr
    wanted = ["127.0.0.0/8", "fd00::/64", "52:54:00:ab:cd:ef", "client1.test"]
    (target,) = node.cli("--json", "target", "list").json()
    assert target["sources"] == wanted
    header, row = node.cli("target", "list").stdout.splitlines()
    assert "SOURCES" in header.split()
    assert ",".join(wanted) in row.split()
    path = "/org/applianced/Appliance1/targets/t1"
    properties = "org.freedesktop.DBus.Properties"
    (value,) = dbus(bus.address, path, properties, "Get", "ss", [TARGET_INTERFACE, "AllowedSources"])
    assert value.value == wanted
    rendered = json.dumps(rules(node))
    assert '"daddr"}}, "right": "127.0.0.1"' in rendered and "52:54:00:ab:cd:ef" in rendered

    # A restart over an intact kernel and firewall changes nothing.
    before = rules(node)
    node.stop()
    node.start()
    assert "reconciled the kernel with 0 change(s)" in node.log_text()
    assert rules(node) == before

    assert node.cli("target", "allow", "t1", "--clear").returncode == 0
    assert node.cli("--json", "target", "list").json()[0]["sources"] == []
    assert node.cli("target", "list").stdout.splitlines()[1].split()[-1] == "any"
    assert rules(node) == ()


@pytest.mark.parametrize(
    ("args", "code", "sentence"),
    [
        (("10.0.0.5/24",), 5, "invalid argument: '10.0.0.5/24' has host bits set; the network is 10.0.0.0/24"),
        (("10.0.0.0/24", "10.0.0.300"), 5, "'10.0.0.300' is not an IP address or network"),
        (("52:54:00:zz:00:01",), 5, "is not an IP address or network, a MAC address or a DNS name"),
        (("ff:ff:ff:ff:ff:ff",), 5, "is a multicast or empty MAC address"),
        (("nowhere.test",), 5, "invalid argument: DNS name nowhere.test does not resolve"),
        (("under_score.test",), 5, "is not an IP address or network"),
        ((), 5, "give the allowed sources, or --clear"),
        (("10.0.0.1", "--clear"), 5, "give the allowed sources, or --clear"),
    ],
)
def test_bad_lists_are_one_sentence_and_change_nothing(node, args, code, sentence):
    assert node.cli("target", "allow", "t1", "127.0.0.21").returncode == 0
    state = (node.state_dir / "state.json").read_bytes()
    kernel = node.kernel_file.read_bytes()
    before = rules(node)

    result = node.cli("target", "allow", "t1", *args)
    assert result.returncode == code
    assert sentence in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (node.state_dir / "state.json").read_bytes() == state
    assert node.kernel_file.read_bytes() == kernel
    assert rules(node) == before


def test_a_portal_that_serves_other_targets_refuses_the_list(node):
    assert node.cli("target", "create", "t2").returncode == 0
    assert node.cli("portal", "create", "::1", "--target", "t1", "--target", "t2").returncode == 0
    state = (node.state_dir / "state.json").read_bytes()
    refused = node.cli("target", "allow", "t1", "127.0.0.21")
    assert refused.returncode == 5
    assert "portal [::1]:3260 serves targets t1, t2, which would have different allow-lists" in refused.stderr
    assert (node.state_dir / "state.json").read_bytes() == state
    assert node.cli("target", "allow", "nope", "127.0.0.21").returncode == 3
