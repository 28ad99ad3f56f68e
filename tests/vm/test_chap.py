"""CHAP on a real kernel: one-way, mutual and discovery CHAP, checked with open-iscsi."""

import pytest

from tests.vm.appliance import VENV_BIN, ApplianceNode

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:chap-client"
PORTAL = "127.0.0.1"
SECRET, MUTUAL, WRONG = "s3cret-s3cret", "mutual-s3cret", "wrong-s3cret!"


@pytest.fixture(scope="module")
def node(module_guest_factory):
    appliance = ApplianceNode(module_guest_factory("chap")).prepare(initiator_name=INITIATOR)
    appliance.start()
    appliance.serve("16M", INITIATOR, PORTAL)
    # Discovery is open until the last test; the node record it creates is reused.
    (iqn,) = appliance.discover(PORTAL)
    appliance.iqn = iqn
    return appliance


def set_node(node, **settings):
    node.set_node(node.iqn, PORTAL, settings)


def try_login(node) -> bool:
    login = node.guest.run(["iscsiadm", "-m", "node", "-T", node.iqn, "-p", PORTAL, "--login"], check=False)
    if login.rc == 0:
        node.logout(node.iqn, PORTAL)
    return login.rc == 0


def set_chap(node, *args, secrets):
    node.guest.run([str(VENV_BIN / "appliancectl"), "chap", *args], input="".join(f"{s}\n" for s in secrets))


def test_one_way_chap(node):
    assert try_login(node), "without CHAP configured the initiator logs in"
    set_chap(node, "target", "t1", secrets=[SECRET])
    assert not try_login(node), "CHAP is now required"
    set_node(node, **{"node.session.auth.authmethod": "CHAP", "node.session.auth.username": INITIATOR})
    set_node(node, **{"node.session.auth.password": WRONG})
    assert not try_login(node), "a wrong secret is refused"
    set_node(node, **{"node.session.auth.password": SECRET})
    assert try_login(node)


def test_mutual_chap(node):
    set_chap(node, "target", "t1", "--mutual", secrets=[SECRET, MUTUAL])
    set_node(
        node,
        **{
            "node.session.auth.username_in": node.iqn,
            "node.session.auth.password_in": WRONG,
        },
    )
    assert not try_login(node), "the initiator refuses a target that cannot prove itself"
    set_node(node, **{"node.session.auth.password_in": MUTUAL})
    assert try_login(node)


def test_acl_credentials_override_the_targets(node):
    set_chap(node, "acl", "t1", INITIATOR, "--user", "alice", secrets=["alice-secret1"])
    assert not try_login(node), "the target's credentials no longer apply to this initiator"
    set_node(
        node,
        **{
            "node.session.auth.username": "alice",
            "node.session.auth.password": "alice-secret1",
            "node.session.auth.username_in": "",
            "node.session.auth.password_in": "",
        },
    )
    assert try_login(node)
    assert node.ctl_json("acl", "list")[0]["auth"] == "chap"


def test_discovery_chap(node):
    set_chap(node, "discovery", "--user", "disco", secrets=[SECRET])
    assert node.discover(PORTAL) == [], "discovery without credentials is refused"
    db = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", PORTAL]
    node.guest.run([*db, "-o", "new"], check=False)
    for key, value in (
        ("discovery.sendtargets.auth.authmethod", "CHAP"),
        ("discovery.sendtargets.auth.username", "disco"),
        ("discovery.sendtargets.auth.password", SECRET),
    ):
        node.guest.run([*db, "-o", "update", "-n", key, "-v", value])
    found = node.guest.run([*db, "--discover"], check=False)
    assert node.iqn in found.stdout, found.describe()
    node.ctl("chap", "discovery", "--off")


def test_required_digests_and_the_negotiation_profile(node):
    # Discovery above rewrote the node record, so CHAP is turned off on both sides here.
    node.ctl("chap", "acl", "t1", INITIATOR, "--off")
    node.ctl("chap", "target", "t1", "--off")
    set_node(node, **{"node.session.auth.authmethod": "None"})
    node.ctl("target", "modify", "t1", "--header-digest", "required", "--data-digest", "required")
    set_node(node, **{"node.conn[0].iscsi.HeaderDigest": "None", "node.conn[0].iscsi.DataDigest": "None"})
    assert not try_login(node), "an initiator without digests is refused"
    set_node(node, **{"node.conn[0].iscsi.HeaderDigest": "CRC32C", "node.conn[0].iscsi.DataDigest": "CRC32C"})
    node.login(node.iqn, PORTAL)
    try:
        negotiated = node.guest.run("iscsiadm -m session -P 2").stdout
        values = dict(
            line.strip().split(": ", 1) for line in negotiated.splitlines() if ": " in line and line.startswith("\t\t")
        )
        assert (values["HeaderDigest"], values["DataDigest"]) == ("CRC32C", "CRC32C")
        assert int(values["MaxBurstLength"]) >= int(values["FirstBurstLength"])
    finally:
        node.logout(node.iqn, PORTAL)
        node.ctl("target", "modify", "t1", "--header-digest", "allowed", "--data-digest", "allowed")
