"""Allow-lists on a real node: LIO behind nftables, open-iscsi and libiscsi on another guest.

Two guests on a private LAN (a bridge in a test-made namespace): the storage node runs
applianced with LIO and the real firewall, the client runs open-iscsi and libiscsi. t1
has the portal 10.99.0.11:3260 to itself and gets the allow-lists; t2, on 3261, never has
one, so it shows what an initiator refused on t1's portal can still learn elsewhere.
"""

import pytest

from tests.vm.appliance import ApplianceNode
from tests.vm.harness import Nic

pytestmark = pytest.mark.vm

NODE, CLIENT = "10.99.0.11", "10.99.0.21"
CLIENT_MAC = "52:54:00:99:00:21"
CLIENT_IQN = "iqn.2026-11.org.applianced.test:client"
STRANGER = "iqn.2026-11.org.applianced.test:stranger"
T1_PORTAL, T2_PORTAL = f"{NODE}:3260", f"{NODE}:3261"


@pytest.fixture(scope="module")
def san(module_guest_factory, module_lab):
    node_guest = module_guest_factory("node", start=False, lab=module_lab, nics=[Nic("lan", f"{NODE}/24")])
    client_guest = module_guest_factory(
        "client", start=False, lab=module_lab, nics=[Nic("lan", f"{CLIENT}/24", mac=CLIENT_MAC)]
    )
    module_guest_factory.start_all(node_guest, client_guest)
    node, client = ApplianceNode(node_guest).prepare(), ApplianceNode(client_guest).prepare(CLIENT_IQN)
    # Names resolve from the node's own hosts file; no DNS server is reachable, nor asked.
    node_guest.write_file("/etc/resolv.conf", "nameserver 127.0.0.1\n")
    node_guest.run(f"echo '{CLIENT} client.san.test' >> /etc/hosts")
    node.start()
    node.ctl_batch(
        ("disk", "create", "d1", "8M"),
        ("disk", "create", "d2", "8M"),
        ("target", "create", "t1"),
        ("target", "create", "t2"),
        ("lun", "add", "t1", "d1"),
        ("lun", "add", "t2", "d2"),
        ("acl", "add", "t1", CLIENT_IQN),
        ("acl", "add", "t2", CLIENT_IQN),
        ("portal", "create", NODE, "--target", "t1"),
        ("portal", "create", NODE, "--port", "3261", "--target", "t2"),
    )
    iqns = {t["name"]: t["iqn"] for t in node.ctl_json("target", "list")}
    return node, client, iqns


def inquiry(client, iqn, portal=T1_PORTAL, initiator=CLIENT_IQN):
    """A libiscsi login and INQUIRY of LUN 0: one attempt, no retries."""
    return client.guest.run(["iscsi-inq", "-i", initiator, f"iscsi://{portal}/{iqn}/0"], check=False)


def send_targets(client, portal, initiator=CLIENT_IQN):
    """What SendTargets through ``portal`` lists for ``initiator`` (libiscsi's iscsi-ls)."""
    done = client.guest.run(["iscsi-ls", "-i", initiator, f"iscsi://{portal}"], check=False)
    return done.rc, done.stdout


def test_only_the_listed_address_logs_in_and_discovers(san):
    node, client, iqns = san
    node.ctl("target", "allow", "t1", CLIENT)
    assert iqns["t1"] in client.discover(T1_PORTAL)
    client.login(iqns["t1"], T1_PORTAL)
    try:
        assert iqns["t1"] in client.session_states()
        assert [s["initiator"] for s in node.ctl_json("target", "sessions", "t1")] == [CLIENT_IQN]
        # Narrowing the list under a logged-in initiator would cut it off: refused unless forced.
        busy = node.ctl("target", "allow", "t1", "10.99.0.0/28", check=False)
        assert busy.rc == 6 and f"{CLIENT_IQN} ({CLIENT})" in busy.stderr, busy.describe()
    finally:
        client.logout(iqns["t1"], T1_PORTAL)

    # A network that does not hold the client: no discovery, no login, with either initiator.
    node.ctl("target", "allow", "t1", "10.99.0.0/28")
    assert client.discover(T1_PORTAL) == []
    rc, listing = send_targets(client, T1_PORTAL)
    assert rc != 0 and iqns["t1"] not in listing
    refused = inquiry(client, iqns["t1"])
    assert refused.rc != 0 and "LIO-ORG" not in refused.stdout
    client.guest.run(["iscsiadm", "-m", "node", "-o", "new", "-T", iqns["t1"], "-p", T1_PORTAL])
    retries = ["-n", "node.session.initial_login_retry_max", "-v", "1"]
    client.guest.run(["iscsiadm", "-m", "node", "-T", iqns["t1"], "-p", T1_PORTAL, "-o", "update", *retries])
    login = client.guest.run(["iscsiadm", "-m", "node", "-T", iqns["t1"], "-p", T1_PORTAL, "--login"], check=False)
    assert login.rc != 0, login.describe()
    assert iqns["t1"] not in client.session_states()
    client.guest.run(["iscsiadm", "-m", "node", "-o", "delete", "-T", iqns["t1"], "-p", T1_PORTAL])
    # t2's portal is not restricted: the client still uses it.
    assert inquiry(client, iqns["t2"], T2_PORTAL).rc == 0


def test_send_targets_through_another_portal(san):
    """What LIO's SendTargets tells a refused source through a portal it may use.

    LIO answers SendTargets with every target whose ACL names the initiator, each with
    all its portals, whichever portal the question came through
    (iscsit_build_sendtargets_response has no per-portal filter). So t1's name and portal
    leak to an initiator with an ACL on t1, though the firewall keeps it from connecting
    there, and LIO keeps it from logging in to t1 through t2's portal.
    """
    node, client, iqns = san
    node.ctl("target", "allow", "t1", "10.99.0.0/28")
    rc, listing = send_targets(client, T2_PORTAL)
    assert rc == 0, listing
    assert iqns["t2"] in listing
    assert iqns["t1"] in listing, "LIO lists t1 (and its portal) through t2's portal: see the docstring"
    assert "LIO-ORG" not in inquiry(client, iqns["t1"], T2_PORTAL).stdout
    assert inquiry(client, iqns["t1"]).rc != 0
    # An initiator that is in no ACL sees neither target there.
    rc, listing = send_targets(client, T2_PORTAL, STRANGER)
    assert iqns["t1"] not in listing and iqns["t2"] not in listing


def test_mac_and_dns_name(san):
    node, client, iqns = san
    node.ctl("target", "allow", "t1", CLIENT_MAC)
    assert "LIO-ORG" in inquiry(client, iqns["t1"]).stdout
    node.ctl("target", "allow", "t1", "52:54:00:99:00:99")
    assert inquiry(client, iqns["t1"]).rc != 0

    node.ctl("target", "allow", "t1", "client.san.test")
    assert node.ctl_json("target", "list")[0]["sources"] == ["client.san.test"]
    assert "LIO-ORG" in inquiry(client, iqns["t1"]).stdout
    unknown = node.ctl("target", "allow", "t1", "nowhere.san.test", check=False)
    assert unknown.rc == 5 and "DNS name nowhere.san.test does not resolve" in unknown.stderr
    assert "LIO-ORG" in inquiry(client, iqns["t1"]).stdout, "a refused change leaves the rules as they were"


def test_restart_keeps_the_rules_and_clear_opens_the_portal(san):
    node, client, iqns = san
    node.ctl("target", "allow", "t1", "10.99.0.0/28", CLIENT_MAC)
    rules = node.guest.run("nft -a list ruleset").stdout
    assert "applianced portal 10.99.0.11:3260" in rules
    quiet = "reconciled at start-up with 0 change(s)"
    quiet_starts = node.log().count(quiet)
    assert node.stop() == 0
    node.start()
    assert node.log().count(quiet) == quiet_starts + 1
    assert node.guest.run("nft -a list ruleset").stdout == rules, "the same table, not a new one"
    node.ctl("target", "allow", "t1", "--clear")
    assert node.guest.run("nft list ruleset").stdout == ""
    assert iqns["t1"] in client.discover(T1_PORTAL)
    assert "LIO-ORG" in inquiry(client, iqns["t1"]).stdout
