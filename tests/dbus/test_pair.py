"""Pairing through appliancectl: input checks, the private pair file, status and unpairing.

The peer is absent here (its link is tested in tests/unit/test_peer_link.py and between
two daemons in tests/netns/test_peer_link.py): the link stays on loopback.
"""

import contextlib
import socket
import stat
import time

from tests.support.daemon import free_udp_port

KEY = "pair-key-for-the-dbus-tier-0123456789"


def pair_args(port, *extra):
    return ("pair", "create", "127.0.0.2", "--local-address", "127.0.0.1", "--port", str(port), *extra)


def test_pair_create_status_and_delete(daemon):
    port = free_udp_port()
    created = daemon.cli(*pair_args(port), input=KEY + "\n")
    assert created.returncode == 0, created.stderr
    pair_file = daemon.state_dir / "pair.json"
    assert stat.S_IMODE(pair_file.stat().st_mode) == 0o600
    status = daemon.cli("--json", "pair", "status")
    assert status.returncode == 0, status.stderr
    shown = status.json()
    assert shown["peer_address"] == "127.0.0.2" and shown["port"] == port
    assert shown["local_addresses"] == ["127.0.0.1"]
    assert shown["connected"] is False and shown["peer_node_id"] == ""
    assert [(p["address"], p["role"], p["up"]) for p in shown["paths"]] == [("127.0.0.2", "main", False)]
    assert set(shown["drops"]) == {"forged", "replayed", "malformed", "unknown-peer", "stale-session"}
    text = daemon.cli("pair", "status")
    assert "connected:     no" in text.stdout and "main 127.0.0.2: down" in text.stdout
    again = daemon.cli(*pair_args(free_udp_port()), input=KEY)
    assert again.returncode == 4 and "paired with 127.0.0.2 already" in again.stderr
    # The key is in the private file only: not in the log, status, or any error.
    everything = daemon.log_text() + status.stdout + text.stdout + again.stderr
    assert KEY not in everything and KEY.encode().hex() not in everything
    assert KEY.encode().hex() in pair_file.read_text()
    assert daemon.cli("pair", "delete").returncode == 0
    assert not pair_file.exists()
    gone = daemon.cli("pair", "status")
    assert gone.returncode == 3 and "not paired" in gone.stderr
    # The port was released: pairing again on it works at once.
    assert daemon.cli(*pair_args(port), input=KEY).returncode == 0


def test_bad_pair_input_is_refused_and_changes_nothing(daemon, tmp_path):
    port = free_udp_port()
    refusals = [
        (pair_args(port), "short-key", 5, "32 to 4096 bytes"),
        (("pair", "create", "not-an-address", "--port", str(port)), KEY, 5, "not an IPv4 or IPv6 address"),
        (pair_args(port, "--aux-address", "127.0.0.2"), KEY, 5, "must differ"),
        (pair_args(70000), KEY, 5, "out of range"),
        (pair_args(port, "--key-file", str(tmp_path)), "", 5, "is not a regular file"),
        (pair_args(port, "--key-file", str(tmp_path / "absent")), "", 5, "cannot read"),
        (("pair", "create", "127.0.0.2", "--local-address", "192.0.2.7"), KEY, 5, "not configured on any interface"),
    ]
    for args, key, code, message in refusals:
        refused = daemon.cli(*args, input=key)
        assert (refused.returncode, message in refused.stderr) == (code, True), (args, refused.stderr)
        assert key not in refused.stderr or key == ""
    assert not (daemon.state_dir / "pair.json").exists()
    assert daemon.cli("pair", "status").returncode == 3
    key_file = tmp_path / "pair.key"
    key_file.write_text(KEY + "\n")
    assert daemon.cli(*pair_args(port, "--key-file", str(key_file))).returncode == 0


def test_the_pair_survives_a_restart(daemon):
    port = free_udp_port()
    assert daemon.cli(*pair_args(port, "--aux-address", "127.0.0.3"), input=KEY).returncode == 0
    daemon.stop()
    daemon.start()
    shown = daemon.cli("--json", "pair", "status").json()
    assert [p["address"] for p in shown["paths"]] == ["127.0.0.2", "127.0.0.3"]
    assert shown["port"] == port


@contextlib.contextmanager
def restarted_with_its_port_taken(daemon):
    """Pair, then restart the daemon while another program holds the link's port."""
    port = free_udp_port()
    assert daemon.cli(*pair_args(port), input=KEY).returncode == 0
    daemon.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        daemon.start()
        yield


def test_a_port_taken_by_another_program_does_not_stop_the_node(daemon):
    with restarted_with_its_port_taken(daemon):
        assert "the peer link is not running" in daemon.log_text()
        shown = daemon.cli("--json", "pair", "status").json()
        assert shown["connected"] is False and [p["up"] for p in shown["paths"]] == [False]
        # Everything else is served.
        assert daemon.cli("target", "create", "t1").returncode == 0
    # The port is free again: the link starts by itself (it is tried every few seconds).
    deadline = time.monotonic() + 30
    while "the peer link is running now" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.5)
    assert daemon.cli("pair", "delete").returncode == 0
    assert not (daemon.state_dir / "pair.json").exists()


def test_a_pair_whose_link_never_started_can_be_deleted(daemon):
    with restarted_with_its_port_taken(daemon):
        assert daemon.cli("pair", "delete").returncode == 0
        assert daemon.cli("pair", "status").returncode == 3
    assert not (daemon.state_dir / "pair.json").exists()


def test_other_users_may_read_the_pair_but_not_change_it(daemon):
    port = free_udp_port()
    refused = daemon.cli(*pair_args(port), input=KEY, user="65534")
    assert refused.returncode == 11 and "permission denied" in refused.stderr
    assert daemon.cli(*pair_args(port), input=KEY).returncode == 0
    shown = daemon.cli("--json", "pair", "status", user="65534")
    assert shown.returncode == 0 and shown.json()["port"] == port
    assert daemon.cli("pair", "delete", user="65534").returncode == 11
    assert (daemon.state_dir / "pair.json").exists()
