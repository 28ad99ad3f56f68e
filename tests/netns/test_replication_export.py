"""The NBD export of a replicated volume, served as the bridge serves it, between namespaces.

A "target" namespace runs qemu-nbd with the bridge's own command line on a small file
(the host kernel has no device-mapper; the VM tier serves a real dm device). A "peer"
namespace holds the peer node's address and one other address. Proven here: the server
advertises what the data path relies on (FLUSH, FUA, several connections), and the
firewall rule of the export admits the peer's address only.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from applianced.replication.bridge import DEFAULT_PORT, server_command
from tests.support.netns import Namespace, link

pytestmark = pytest.mark.netns

TARGET, PEER, STRANGER = "10.233.0.2", "10.233.0.1", "10.233.0.3"
SIZE = 16 << 20

APPLY_RULES = textwrap.dedent(
    """
    import sys
    from applianced.iscsi.firewall import NftFirewall, ruleset
    from applianced.replication.bridge import export_filter
    rules = ruleset([export_filter(sys.argv[1], int(sys.argv[2]), sys.argv[3])])
    print(NftFirewall().apply(rules), NftFirewall().observe() == rules)
    """
)

CONNECT_FROM = textwrap.dedent(
    """
    import socket, sys
    with socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5, source_address=(sys.argv[1], 0)) as s:
        print(s.recv(8).decode())
    """
)


@pytest.fixture
def export(tmp_path):
    target, peer = Namespace("repl-target"), Namespace("repl-peer")
    try:
        link(target, [f"{TARGET}/24"], peer, [f"{PEER}/24", f"{STRANGER}/24"], names=("veth-t", "veth-p"))
        volume = tmp_path / "volume.img"
        with volume.open("wb") as f:
            f.truncate(SIZE)
        command = server_command("vol", str(volume), TARGET, DEFAULT_PORT, tmp_path / "server.pid")
        subprocess.run([*target.exec_prefix, *command], check=True, capture_output=True, timeout=60)
        yield target, peer
    finally:
        pid_file = tmp_path / "server.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], check=False)
        target.delete()
        peer.delete()


def connect(peer, source):
    """What the server says first to a TCP connection from ``source`` (or how it failed)."""
    done = peer.run(sys.executable, "-c", CONNECT_FROM, source, TARGET, str(DEFAULT_PORT))
    return done.stdout.strip() if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def test_the_server_advertises_flush_fua_and_several_connections(export):
    _, peer = export
    done = peer.run("nbdinfo", "--json", f"nbd://{TARGET}:{DEFAULT_PORT}/vol")
    assert done.returncode == 0, done.stderr
    (info,) = json.loads(done.stdout)["exports"]
    assert info["export-size"] == SIZE
    assert info["can_flush"] and info["can_fua"] and info["can_multi_conn"]
    assert not info["is_read_only"]


def test_only_the_peer_reaches_the_export(export):
    target, peer = export
    assert connect(peer, PEER) == connect(peer, STRANGER) == "NBDMAGIC"

    done = target.run(sys.executable, "-c", APPLY_RULES, TARGET, str(DEFAULT_PORT), PEER)
    assert done.stdout.split() == ["True", "True"], done.stderr
    assert connect(peer, PEER) == "NBDMAGIC"
    assert connect(peer, STRANGER) == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert "applianced replication export" in target.run("nft", "list", "ruleset").stdout

    # Applying the same rules again changes nothing.
    done = target.run(sys.executable, "-c", APPLY_RULES, TARGET, str(DEFAULT_PORT), PEER)
    assert done.stdout.split() == ["False", "True"], done.stderr
