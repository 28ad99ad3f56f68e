"""What sessions negotiated at login, on a real kernel with open-iscsi.

The daemon learns it from LIO's debug messages, read by the sampler every few seconds, so
each test polls ``appliancectl target sessions`` until the new login's values show.
"""

import time

import pytest

from tests.vm.appliance import VENV_BIN, ApplianceNode
from tests.vm.test_chap import set_node

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:negotiated-client"
PORTAL = "127.0.0.1"  # as in test_chap, whose set_node is used
# The target's offer (iscsi/kernel/model.py NEGOTIATION_PROFILE).
TARGET_MAX_BURST = 262144
SECRET = "s3cret-s3cret"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    appliance = ApplianceNode(module_guest_factory("negotiated")).prepare(initiator_name=INITIATOR)
    appliance.start()
    appliance.serve("16M", INITIATOR, PORTAL)
    (iqn,) = appliance.discover(PORTAL)
    appliance.iqn = iqn
    return appliance


def wait_for_login(node, header_digest, timeout=180):
    """The session once the daemon shows what its login negotiated, with that header digest."""
    deadline = time.monotonic() + timeout
    while True:
        rows = node.ctl_json("target", "sessions", "t1")
        if rows and rows[0]["negotiated"].get("HeaderDigest") == header_digest:
            return rows[0]
        assert time.monotonic() < deadline, f"no session negotiated HeaderDigest {header_digest}: {rows}"
        time.sleep(1)


def test_the_daemon_turns_on_lios_login_messages(node):
    control = node.guest.run("grep -E 'iscsi_set_(connection|session)_parameters =pft' /proc/dynamic_debug/control")
    assert len(control.stdout.splitlines()) > 20, control.stdout


def test_required_digests_are_negotiated(node):
    node.ctl("target", "modify", "t1", "--header-digest", "required", "--data-digest", "required")
    set_node(node, **{"node.conn[0].iscsi.HeaderDigest": "CRC32C", "node.conn[0].iscsi.DataDigest": "CRC32C"})
    node.login(node.iqn, PORTAL)
    try:
        session = wait_for_login(node, "CRC32C")
        negotiated = session["negotiated"]
        assert negotiated["DataDigest"] == "CRC32C"
        assert int(negotiated["MaxBurstLength"]) <= TARGET_MAX_BURST
        assert int(negotiated["FirstBurstLength"]) <= int(negotiated["MaxBurstLength"])
        assert negotiated["ErrorRecoveryLevel"] == "0"
        # The target offers 0; open-iscsi's default, 2, is larger and wins.
        assert negotiated["DefaultTime2Wait"] == "2"
        table = node.ctl("target", "sessions", "t1").stdout
        assert "HEADER-DIGEST" in table and "CRC32C" in table, table
    finally:
        node.logout(node.iqn, PORTAL)


def test_allowed_digests_follow_the_initiator(node):
    node.ctl("target", "modify", "t1", "--header-digest", "allowed", "--data-digest", "allowed")
    set_node(
        node,
        **{
            "node.conn[0].iscsi.HeaderDigest": "None",
            "node.conn[0].iscsi.DataDigest": "None",
            "node.session.iscsi.MaxBurstLength": "131072",
            "node.session.iscsi.FirstBurstLength": "32768",
            "node.session.iscsi.DefaultTime2Wait": "0",
        },
    )
    node.login(node.iqn, PORTAL)
    try:
        negotiated = wait_for_login(node, "None")["negotiated"]
        assert negotiated["DataDigest"] == "None"
        # Both sides' lowest offer wins.
        assert negotiated["MaxBurstLength"] == "131072"
        assert negotiated["FirstBurstLength"] == "32768"
        # An initiator that offers no pause after a lost connection gets none (failover).
        assert negotiated["DefaultTime2Wait"] == "0"
    finally:
        node.logout(node.iqn, PORTAL)
    kernel_log = node.guest.run("dmesg | grep -E 'iscsi_set_(connection|session)_parameters' | tail -60").stdout
    print(kernel_log)  # the real text behind tests/unit/test_negotiation.py


def test_a_chap_login_shows_its_auth_method(node):
    node.guest.run([str(VENV_BIN / "appliancectl"), "chap", "target", "t1"], input=f"{SECRET}\n")
    set_node(
        node,
        **{
            "node.conn[0].iscsi.HeaderDigest": "CRC32C",
            "node.session.auth.authmethod": "CHAP",
            "node.session.auth.username": INITIATOR,
            "node.session.auth.password": SECRET,
        },
    )
    node.login(node.iqn, PORTAL)
    try:
        negotiated = wait_for_login(node, "CRC32C")["negotiated"]
        assert negotiated["AuthMethod"] == "CHAP"
    finally:
        node.logout(node.iqn, PORTAL)
