"""Multipath on a real kernel: one initiator, one target, two portals (IPv4 and IPv6).

open-iscsi opens one session per portal; both paths must reach the same LUN (same
serial) and see each other's writes, and the daemon must report both sessions.
"""

import pytest

from tests.vm.appliance import ApplianceNode

pytestmark = pytest.mark.vm

INITIATOR = "iqn.2026-11.org.applianced.test:mpio-client"
PORTALS = ("127.0.0.1", "::1")


@pytest.fixture(scope="module")
def node(module_guest_factory):
    appliance = ApplianceNode(module_guest_factory("mpio")).prepare(initiator_name=INITIATOR)
    appliance.start()
    appliance.serve("16M", INITIATOR, PORTALS[0])
    appliance.ctl("portal", "create", PORTALS[1])
    return appliance


def paths_of(node, serial: str) -> list[str]:
    """Every SCSI disk of the initiator whose unit serial is ``serial``."""
    out = node.guest.run(
        "for d in /sys/block/sd*; do printf '%s %s\\n' ${d##*/} \"$(cat $d/device/vpd_pg80 2>/dev/null"
        " | tr -dc '[:print:]')\"; done"
    )
    return sorted(f"/dev/{line.split()[0]}" for line in out.stdout.splitlines() if line.endswith(serial))


def test_two_sessions_reach_one_lun(node):
    (target,) = node.ctl_json("target", "list")
    (disk,) = node.ctl_json("disk", "list")
    for portal in PORTALS:
        # SendTargets through either portal lists the target once per portal.
        assert node.discover(f"[{portal}]" if ":" in portal else portal) == [target["iqn"]] * 2
    for portal in PORTALS:
        node.login(target["iqn"], f"[{portal}]" if ":" in portal else portal)
    node.device_for_serial(disk["serial"])
    node.guest.wait_until(f"test $(grep -l {disk['serial']} /sys/block/sd*/device/vpd_pg80 | wc -l) = 2", timeout=60)
    first, second = paths_of(node, disk["serial"])

    node.guest.run(f"head -c 1M /dev/urandom > /tmp/pattern && dd if=/tmp/pattern of={first} bs=1M oflag=direct")
    node.guest.run(f"dd if={second} of=/tmp/readback bs=1M count=1 iflag=direct && cmp /tmp/pattern /tmp/readback")

    # LIO names only the newest session of the initiator; the count and the connections
    # show both paths.
    (listed,) = node.ctl_json("target", "list")
    assert listed["status"] == "logged in (2)"
    (session,) = node.ctl_json("target", "sessions", "t1")
    assert session["initiator"] == INITIATOR and session["state"] == "LOGGED_IN"
    assert session["portals"] in ("127.0.0.1:3260", "[::1]:3260") and session["luns"] == "0"
    connections = node.ctl_json("target", "connections", "t1")
    assert sorted(c["portal"] for c in connections) == ["127.0.0.1:3260", "[::1]:3260"]

    # Either path alone keeps the LUN reachable.
    node.logout(target["iqn"], "127.0.0.1")
    node.guest.wait_until(f"test $(grep -l {disk['serial']} /sys/block/sd*/device/vpd_pg80 | wc -l) = 1", timeout=60)
    (remaining,) = paths_of(node, disk["serial"])
    node.guest.run(f"dd if={remaining} of=/tmp/readback bs=1M count=1 iflag=direct && cmp /tmp/pattern /tmp/readback")
    (listed,) = node.ctl_json("target", "list")
    assert listed["status"] == "logged in (1)"
    assert [c["portal"] for c in node.ctl_json("target", "connections", "t1")] == ["[::1]:3260"]
