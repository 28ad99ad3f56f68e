"""Session reads stay linear in the number of targets.

Every Target object has a live ``Sessions`` property, which dbus-fast reads when it exports
the object (InterfacesAdded) and again for ``GetManagedObjects``. When each read covered
every target, N exported targets cost N * N configfs reads after each start and import.
This runs the engine and the real object tree in-process on the private bus, with the
in-memory kernel counting which targets each session read covers.
"""

import asyncio
import json

from dbus_fast import BusType, Message
from dbus_fast.aio import MessageBus

from applianced.bus import paths
from applianced.bus.objects import ObjectTree
from applianced.constants import BUS_NAME, ROOT_PATH
from applianced.engine import EXPORT_FORMAT, Appliance
from applianced.failover.service import Failover
from applianced.iscsi.kernel.model import Session
from applianced.peer.service import Peer
from applianced.replication.service import Replication
from applianced.state import Acl, Config, StateStore, Target
from tests.support.fake_firewall import FakeFirewall
from tests.support.fake_kernel import FakeKernel

TARGETS = 30
INITIATOR = "iqn.2026-11.org.applianced.test:client{i}"


def test_each_target_reads_only_its_own_sessions(bus, tmp_path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    targets = {
        f"t{i}": Target(f"t{i}", f"iqn.2026-11.org.applianced.test:t{i}", acls=(Acl(INITIATOR.format(i=i)),))
        for i in range(TARGETS)
    }
    kernel = FakeKernel()
    kernel.session_list = [Session(t.iqn, t.acls[0].initiator, "LOGGED_IN", ()) for t in targets.values()]

    async def scenario():
        engine = Appliance(kernel, StateStore(tmp_path, "state.json"), lambda: set(), FakeFirewall())
        server = await MessageBus(bus_type=BusType.SYSTEM).connect()
        client = await MessageBus(bus_address=bus.address).connect()
        try:
            peer = Peer(tmp_path, lambda: set())
            replication = Replication(tmp_path, engine, peer)
            ObjectTree(server, engine, peer, replication, Failover(tmp_path, engine, peer, replication))
            await engine.start()
            # The import exports one object per target, as a start over a stored state does.
            imported = Config(node_id=engine.config.node_id, targets=targets)
            await engine.import_configuration(json.dumps({"format": EXPORT_FORMAT, **imported.to_json()}))
            await server.request_name(BUS_NAME)
            reply = await client.call(
                Message(
                    destination=BUS_NAME,
                    path=ROOT_PATH,
                    interface="org.freedesktop.DBus.ObjectManager",
                    member="GetManagedObjects",
                )
            )
            # Let the getters started by the exports finish too.
            await asyncio.sleep(0.5)
            return reply.body[0]
        finally:
            client.disconnect()
            server.disconnect()

    objects = asyncio.run(scenario())
    assert kernel.session_reads, "the Sessions properties were read"
    assert sorted(set(kernel.session_reads)) == sorted(t.iqn for t in targets.values())
    # Sessions, SessionCount and Connections each read once per export and once per call.
    assert len(kernel.session_reads) <= 3 * 2 * TARGETS
    for name, target in targets.items():
        (session,) = objects[paths.target_path(name)]["org.applianced.Appliance1.Target"]["Sessions"].value
        assert session["Initiator"].value == target.acls[0].initiator
