"""How the copy's node answers the source's requests: which answer at once and which wait
for a change in progress there (its replication lock), and which change its kernel. A
status read must not time out behind a reconcile of many LUNs, or the source takes "busy"
for "gone"; a continue must not cost the copy's node a reconcile, nor each copy forked
anew one of its own. A node that becomes the copy of many disks again (demoted after a
failover) starts their exports' servers side by side, not one after the other. What the
target service reads of the mirrors from its reconcile's thread holds while the requests
add mirrors on the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from applianced.replication import messages
from applianced.replication.bridge import Volume
from applianced.replication.generations import Generation
from applianced.replication.records import SOURCE, SYNC, TARGET, MirrorRecord, Tunables
from applianced.replication.service import Replication, Runtime
from tests.support.fake_datapath import FakeDataPath, FakeExport, FakeMirror


class Peer:
    """Only what the service registers with: its handlers of the peer's requests."""

    def __init__(self) -> None:
        self.handlers = {}

    def handle(self, kind, handler) -> None:
        self.handlers[kind] = handler


class Engine:
    """Counts the reconciles that replication asks of the target service."""

    def __init__(self) -> None:
        self.reconciles = 0

    async def refresh_replication(self, read_back: bool = True) -> int:
        self.reconciles += 1
        return 0


def copy_node(tmp_path, disks=("d1",), role=TARGET) -> tuple[Replication, Peer]:
    peer = Peer()
    service = Replication(tmp_path, engine=Engine(), peer=peer, data=FakeDataPath(tmp_path, tmp_path / "data.json"))
    for index, disk in enumerate(disks):
        record = MirrorRecord(
            disk=disk,
            role=role,
            mode=SYNC,
            source_address="127.0.0.1",
            target_address="127.0.0.1",
            port=47101 + index,
            size=1 << 20,
            region=1 << 16,
            generation=Generation("g1"),
        )
        service.mirrors[disk] = Runtime(record, Volume(disk, str(tmp_path / f"{disk}.img"), True, 1 << 20, 1 << 16))
    return service, peer


def test_a_status_request_is_answered_while_a_change_holds_the_lock_and_a_change_waits(tmp_path):
    service, peer = copy_node(tmp_path)
    disk = messages.pack(messages.Disk("d1"))

    async def while_busy():
        async with service._lock:
            answer = await asyncio.wait_for(peer.handlers[messages.STATUS](disk), 1.0)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(peer.handlers[messages.LOCK](disk), 0.2)
        return messages.unpack(answer, messages.Status)

    status = asyncio.run(while_busy())
    assert (status.role, status.generation.current, status.serving) == (TARGET, "g1", False)


@pytest.mark.parametrize(
    ("source_address", "reconciles"),
    [("127.0.0.1", 0), ("127.0.0.3", 1)],
    ids=["a continue: nothing in the kernel changes", "a new source address: the export's rule changes"],
)
def test_an_update_reconciles_the_copys_node_only_when_an_address_changes(tmp_path, source_address, reconciles):
    service, peer = copy_node(tmp_path)
    update = messages.Update("d1", SYNC, "pause", Tunables(), source_address, "127.0.0.1")

    asyncio.run(peer.handlers[messages.UPDATE](messages.pack(update)))

    record = service.mirrors["d1"].record
    assert (record.intent, record.source_address) == ("pause", source_address)
    assert service.engine.reconciles == reconciles


def test_copies_forked_anew_in_one_pass_cost_one_reconcile_before_and_one_after(tmp_path):
    service, _ = copy_node(tmp_path, disks=("d1", "d2", "d3"))
    for rt in service.mirrors.values():
        rt.array_prepared = rt.fork_due = True  # each reported in sync by its source

    asyncio.run(service._monitor_pass())

    assert service.engine.reconciles == 2
    assert all(rt.array_prepared and not rt.fork_due for rt in service.mirrors.values())


def test_a_demoted_node_serves_its_copies_side_by_side(tmp_path, monkeypatch):
    disks = ("d1", "d2", "d3", "d4")
    service, _ = copy_node(tmp_path, disks=disks, role=SOURCE)
    # Each server start waits until all of them have begun: one after the other, the first
    # would wait in vain.
    all_started = threading.Barrier(len(disks), timeout=5)
    start_server = FakeExport.assemble

    def slow_start(export, address, port, fresh=False):
        all_started.wait()
        start_server(export, address, port, fresh)

    monkeypatch.setattr(FakeExport, "assemble", slow_start)

    asyncio.run(service.prepare_targets(list(disks)))

    assert {rt.record.role for rt in service.mirrors.values()} == {TARGET}
    assert all(service._export(rt).server_pid() for rt in service.mirrors.values())


def test_the_target_services_view_holds_while_a_mirror_is_added(tmp_path, monkeypatch):
    # The reconcile reads the prepared arrays on its thread while the peer's requests make
    # mirrors on the loop: here, a mirror is added in the middle of the read.
    service, _ = copy_node(tmp_path, disks=("d1", "d2"))
    for rt in service.mirrors.values():
        rt.array_prepared = True
    node_of = FakeMirror.node.fget

    def node_while_a_mirror_is_added(mirror):
        if "d3" not in service.mirrors:
            more, _ = copy_node(tmp_path, disks=("d3",))
            service.mirrors["d3"] = more.mirrors["d3"]
        return node_of(mirror)

    monkeypatch.setattr(FakeMirror, "node", property(node_while_a_mirror_is_added))

    standby = service.standby()

    assert set(standby) == {"d1", "d2"}
    assert set(service.unserved()) == {"d1", "d2", "d3"}
