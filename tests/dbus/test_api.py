"""The D-Bus API as clients see it: documented introspection, object tree, errors, options."""

import asyncio
import xml.etree.ElementTree as ET

import pytest
from dbus_fast.aio import MessageBus

from applianced.bus.mirror import JobInterface
from applianced.cli.client import Client, Connection, DBusError, run_without_loop
from applianced.cli.wire import Variant
from applianced.constants import JOB_INTERFACE, MIRROR_INTERFACE, ROOT_PATH
from tests.support.daemon import INITIATOR, REPO, Daemon, free_udp_port
from tests.support.fake_kernel import FAIL_ENV
from tests.support.signals import watch_properties

DOCUMENTED = REPO / "dbus" / "org.applianced.Appliance1.xml"


def dbus(address, *args):
    """One call through the CLI's client, on its own connection."""
    client = Client(Connection.open(address))
    try:
        return run_without_loop(client.call(*args))
    finally:
        client.close()


def interfaces_of(xml_text):
    """Interface name -> (sorted methods with arg signatures, sorted properties)."""
    shape = {}
    for interface in ET.fromstring(xml_text).iter("interface"):
        name = interface.get("name")
        if not name.startswith("org.applianced."):
            continue
        methods = sorted(
            (m.get("name"), tuple((a.get("direction", "in"), a.get("type")) for a in m.iter("arg")))
            for m in interface.iter("method")
        )
        properties = sorted((p.get("name"), p.get("type"), p.get("access")) for p in interface.iter("property"))
        shape[name] = (methods, properties)
    return shape


def test_introspection_matches_the_documented_api(daemon, bus):
    daemon.configure_first_slice()
    assert daemon.cli("boot", "create", "pc1", "t1", INITIATOR, "--portal", "192.0.2.10").returncode == 0
    # Paired over loopback only, so that the Peer object exists.
    pair = ("pair", "create", "127.0.0.2", "--local-address", "127.0.0.1", "--port", str(free_udp_port()))
    assert daemon.cli(*pair, input="k" * 32).returncode == 0
    (objects,) = dbus(bus.address, ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    live = {}
    for path in [ROOT_PATH, *objects]:
        (xml_text,) = dbus(bus.address, path, "org.freedesktop.DBus.Introspectable", "Introspect")
        live.update(interfaces_of(xml_text))
    documented = interfaces_of(DOCUMENTED.read_text())
    # A Mirror exists only on a paired node with a mirror (tests/netns/test_replication.py
    # checks it), a Job only while a resync runs: checked below from the object itself.
    assert set(documented) - set(live) == {MIRROR_INTERFACE, JOB_INTERFACE}
    assert live == {name: shape for name, shape in documented.items() if name in live}


def test_the_job_object_is_the_documented_one():
    job = JobInterface(None, "d1")
    assert interfaces_of(f"<node>{ET.tostring(job.introspect().to_xml()).decode()}</node>") == {
        JOB_INTERFACE: interfaces_of(DOCUMENTED.read_text())[JOB_INTERFACE]
    }
    signals = {s.get("name"): [a.get("type") for a in s.iter("arg")] for s in ET.parse(DOCUMENTED).iter("signal")}
    assert signals == {"Completed": ["b", "s"]}


def test_object_tree_uses_stable_escaped_paths(daemon, bus):
    daemon.configure_first_slice()
    (objects,) = dbus(bus.address, ROOT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    # The manager itself is not among the objects it manages (ObjectManager semantics).
    assert set(objects) == {
        f"{ROOT_PATH}/disks/d1",
        f"{ROOT_PATH}/targets/t1",
        f"{ROOT_PATH}/targets/t1/luns/0",
        f"{ROOT_PATH}/targets/t1/acls/iqn_2e1994_2d05_2ecom_2eredhat_3aclient1",
        f"{ROOT_PATH}/portals/127_2e0_2e0_2e1_3a3260",
        f"{ROOT_PATH}/failover",
    }
    lun = objects[f"{ROOT_PATH}/targets/t1/luns/0"]["org.applianced.Appliance1.Lun"]
    assert lun["Disk"].value == f"{ROOT_PATH}/disks/d1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"colour": Variant("s", "red")}, "does not take option"),
        ({"description": Variant("u", 1)}, "must have type 's'"),
    ],
)
def test_options_are_checked(daemon, bus, options, message):
    with pytest.raises(DBusError) as raised:
        dbus(bus.address, ROOT_PATH, "org.applianced.Appliance1.Manager", "CreateTarget", "sa{sv}", ["t9", options])
    assert raised.value.type == "org.applianced.Appliance1.Error.InvalidArgument"
    assert message in raised.value.text
    assert daemon.cli("--json", "target", "list").json() == []


def test_lun_on_a_path_that_is_not_a_disk_is_invalid(daemon, bus):
    daemon.configure_first_slice()
    with pytest.raises(DBusError) as raised:
        dbus(
            bus.address,
            f"{ROOT_PATH}/targets/t1",
            "org.applianced.Appliance1.Target",
            "AddLun",
            "oa{sv}",
            [ROOT_PATH, {}],
        )
    assert raised.value.type == "org.applianced.Appliance1.Error.InvalidArgument"


def test_unexpected_failures_are_named_and_keep_the_traceback_on_the_server(bus, tmp_path):
    daemon = Daemon(bus.address, tmp_path, {FAIL_ENV: "crash:CreateTarget"})
    daemon.start()
    try:
        with pytest.raises(DBusError) as raised:
            dbus(bus.address, ROOT_PATH, "org.applianced.Appliance1.Manager", "CreateTarget", "sa{sv}", ["t1", {}])
        assert raised.value.type == "org.applianced.Appliance1.Error.Failed"
        assert "Traceback" not in raised.value.text and "injected" not in raised.value.text
        assert "Traceback" in daemon.log_text() and "injected crash on CreateTarget" in daemon.log_text()
        # The failure was rolled back: the target is neither listed nor kept in the state.
        assert daemon.cli("--json", "target", "list").json() == []
    finally:
        daemon.stop()


def test_other_users_may_read_but_not_change(daemon):
    daemon.configure_first_slice()
    listing = daemon.cli("--json", "disk", "list", user="65534")
    assert listing.returncode == 0 and [d["name"] for d in listing.json()] == ["d1"]
    for args in (("disk", "create", "d2", "1M"), ("disk", "delete", "d1"), ("target", "delete", "t1")):
        refused = daemon.cli(*args, user="65534")
        assert refused.returncode == 11
        assert "permission denied" in refused.stderr
    assert [d["name"] for d in daemon.cli("--json", "disk", "list").json()] == ["d1"]
    assert [t["name"] for t in daemon.cli("--json", "target", "list").json()] == ["t1"]


def test_changes_are_announced_with_properties_changed(daemon, bus):
    daemon.configure_first_slice()
    path = f"{ROOT_PATH}/targets/t1"

    async def watch_and_modify():
        watcher = await MessageBus(bus_address=bus.address).connect()
        seen = asyncio.get_running_loop().create_future()

        def on_message(message):
            if message.member == "PropertiesChanged" and message.path == path and not seen.done():
                seen.set_result(message.body)

        watcher.add_message_handler(on_message)
        await watch_properties(watcher, path)
        # The CLI's client blocks: the signal waits in the watcher's socket until it returns.
        dbus(
            bus.address,
            path,
            "org.applianced.Appliance1.Target",
            "Modify",
            "a{sv}a{sv}",
            [{"alias": Variant("s", "Mail store")}, {}],
        )
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            watcher.disconnect()

    interface, changed, _ = asyncio.run(watch_and_modify())
    assert interface == "org.applianced.Appliance1.Target"
    assert {name: value.value for name, value in changed.items()} == {"Alias": "Mail store"}
