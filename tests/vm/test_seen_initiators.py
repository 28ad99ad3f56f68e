"""Recently seen initiators on a real kernel: logins and refusals by open-iscsi and libiscsi.

The daemon samples LIO every few seconds, so each test polls ``appliancectl initiator
seen`` until the sighting shows (never a fixed sleep).
"""

import signal
import time

import pytest

from tests.vm.appliance import VENV_BIN, ApplianceNode

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:seen-client"
STRANGER = "iqn.2026-11.org.applianced.test:stranger"
PORTAL = "127.0.0.1"
SECRET, WRONG = "s3cret-s3cret", "wrong-s3cret!"
LOGGED_IN = "logged in"
NOT_IN_ACL = "refused: not in ACL"
CHAP_FAILED = "refused: CHAP authentication failed"
NEGOTIATION = "refused: negotiation failed"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    appliance = ApplianceNode(module_guest_factory("seen")).prepare(initiator_name=INITIATOR)
    appliance.start()
    appliance.serve("16M", INITIATOR, PORTAL)
    (iqn,) = appliance.discover(PORTAL)
    appliance.iqn = iqn
    return appliance


def counts(rows):
    return {(r["initiator"], r["outcome"]): r["count"] for r in rows}


def wait_for(node, initiator, outcome, count=1, timeout=180):
    """The row of ``initiator`` with ``outcome`` once its count reached ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        rows = node.ctl_json("initiator", "seen")
        found = next((r for r in rows if r["initiator"] == initiator and r["outcome"] == outcome), None)
        if found and found["count"] >= count:
            return found
        assert time.monotonic() < deadline, f"{initiator} {outcome} x{count} not seen in {timeout} s: {rows}"
        time.sleep(1)


def iscsiadm_node(node, *args, check=True):
    return node.guest.run(["iscsiadm", "-m", "node", "-T", node.iqn, "-p", PORTAL, *args], check=check)


def set_node(node, **settings):
    for key, value in settings.items():
        iscsiadm_node(node, "-o", "update", "-n", key, "-v", value)


def libiscsi_inquiry(node, initiator, credentials=""):
    user = f"{credentials}@" if credentials else ""
    return node.guest.run(["iscsi-inq", "-i", initiator, f"iscsi://{user}{PORTAL}/{node.iqn}/0"], check=False)


def test_an_allowed_login_is_seen_with_its_address(node):
    node.login(node.iqn, PORTAL)
    try:
        row = wait_for(node, INITIATOR, LOGGED_IN)
    finally:
        node.logout(node.iqn, PORTAL)
    assert (row["address"], row["target"], row["count"]) == (PORTAL, "t1", 1)


def test_an_initiator_outside_the_acl_is_seen_refused_with_its_name(node):
    refused = libiscsi_inquiry(node, STRANGER)
    assert refused.rc != 0 and "Authorization failure" in refused.stderr, refused.describe()
    row = wait_for(node, STRANGER, NOT_IN_ACL)
    assert (row["address"], row["target"], row["count"]) == (PORTAL, "t1", 1)


def test_a_wrong_chap_secret_is_seen_refused_with_the_reason(node):
    node.guest.run([str(VENV_BIN / "appliancectl"), "chap", "target", "t1"], input=f"{SECRET}\n")
    set_node(
        node,
        **{
            "node.session.auth.authmethod": "CHAP",
            "node.session.auth.username": INITIATOR,
            "node.session.auth.password": WRONG,
        },
    )
    assert iscsiadm_node(node, "--login", check=False).rc != 0, "open-iscsi with a wrong secret is refused"
    row = wait_for(node, INITIATOR, CHAP_FAILED)
    assert (row["address"], row["target"], row["count"]) == (PORTAL, "t1", 1)
    # libiscsi with a wrong secret: the same initiator, counted again.
    refused = libiscsi_inquiry(node, INITIATOR, f"{INITIATOR.replace(':', '%3A')}%{WRONG}")
    assert "Authentication failure" in refused.stderr, refused.describe()
    assert wait_for(node, INITIATOR, CHAP_FAILED, count=2)["count"] == 2
    node.ctl("chap", "target", "t1", "--off")
    set_node(node, **{"node.session.auth.authmethod": "None"})


def test_a_refused_negotiation_is_counted_once(node):
    # LIO counts this refusal twice in negotiate_fails (its answer, then the dropped connection).
    node.ctl("target", "modify", "t1", "--header-digest", "required")
    set_node(node, **{"node.conn[0].iscsi.HeaderDigest": "None"})
    try:
        assert iscsiadm_node(node, "--login", check=False).rc != 0, "an initiator without digests is refused"
        row = wait_for(node, INITIATOR, NEGOTIATION)
    finally:
        node.ctl("target", "modify", "t1", "--header-digest", "allowed")
    assert (row["address"], row["count"]) == (PORTAL, 1)


def test_the_list_survives_a_daemon_restart_without_counting_twice(node):
    before = counts(node.ctl_json("initiator", "seen"))
    assert set(before) == {
        (INITIATOR, LOGGED_IN),
        (STRANGER, NOT_IN_ACL),
        (INITIATOR, CHAP_FAILED),
        (INITIATOR, NEGOTIATION),
    }
    assert node.stop(signal.SIGTERM) == 0, node.log()
    node.start()
    assert counts(node.ctl_json("initiator", "seen")) == before
    # A refusal after the restart is counted once; samples after the restart did not count
    # again what the previous daemon had counted.
    assert libiscsi_inquiry(node, STRANGER).rc != 0
    wait_for(node, STRANGER, NOT_IN_ACL, count=2)
    assert counts(node.ctl_json("initiator", "seen")) == before | {(STRANGER, NOT_IN_ACL): 2}
    mode = node.guest.run(["stat", "-c", "%a", "/var/lib/applianced/initiators.json"]).stdout.strip()
    assert mode == "600"
