"""The engine with the in-memory kernel: operations, refusals, roll-back, restart."""

import asyncio
import dataclasses
import ipaddress
import json
import logging
import stat
from pathlib import Path

import pytest

from applianced.engine import Appliance, NoReplication
from applianced.errors import AlreadyExists, Busy, InvalidArgument, KernelError, NotFound, NotSupported, StateError
from applianced.iscsi import bootprofile, diskfile, firewall
from applianced.iscsi.kernel.model import Session, StorageObject
from applianced.iscsi.kernel.plan import SetTpgEnabled
from applianced.state import Chap, Portal, StateStore
from tests.support.fake_firewall import FakeFirewall
from tests.support.fake_kernel import FakeKernel

INITIATOR = "iqn.1994-05.com.redhat:client1"
LOCAL = {"127.0.0.1", "10.1.0.5", "fd00::5"}
# What the injected resolver knows; any other name does not resolve.
HOSTS = {"client1.example": {"10.1.0.21"}}


def resolve(name):
    if name not in HOSTS:
        raise OSError(f"{name}: Name or service not known")
    return HOSTS[name]


def make_engine(tmp_path, kernel=None, firewall=None, resolver=None):
    store = StateStore(tmp_path / "state", "state.json")
    return Appliance(kernel or FakeKernel(), store, lambda: LOCAL, firewall or FakeFirewall(), resolver or resolve)


def run(coro):
    return asyncio.run(coro)


async def started(engine):
    await engine.start()
    return engine


async def populate(engine):
    await engine.create_disk("d1", 64 << 20)
    await engine.create_target("t1")
    await engine.add_lun("t1", "d1")
    await engine.add_acl("t1", INITIATOR)
    await engine.create_portal("10.1.0.5", 3260)


def test_full_slice_reaches_kernel_and_state(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        return engine

    engine = run(scenario())
    kernel = engine.kernel.snapshot()
    iqn = "iqn.2003-01.org.linux-iscsi.applianced:t1"
    target = kernel.targets[iqn]
    assert target.enabled
    assert target.luns == {0: "d1"}
    assert set(target.acls) == {INITIATOR}
    assert target.portals == {("10.1.0.5", 3260)}
    disk_file = tmp_path / "state" / "disks" / "d1.img"
    # LIO's block backstore on the disk's own device, which maps the file (not its trailer).
    device = kernel.disk_devices["d1"]
    assert kernel.storage_objects["d1"] == StorageObject(
        "d1", device.node, 0, engine.config.disks["d1"].serial, plugin="block"
    )
    assert (device.lower, device.lower_is_file, device.size, device.direct_io) == (str(disk_file), True, 64 << 20, True)
    assert disk_file.stat().st_size == (64 << 20) + diskfile.TRAILER_SIZE
    assert disk_file.stat().st_blocks * 512 <= diskfile.TRAILER_SIZE, "sparse: only the trailer is written"
    assert diskfile.read_marker(disk_file) == diskfile.Marker("d1", engine.config.disks["d1"].serial, 64 << 20)
    assert stat.S_IMODE(disk_file.stat().st_mode) == 0o600
    assert engine.store.load() == engine.config


def test_restart_over_intact_kernel_changes_nothing_and_reboot_restores(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        await populate(await started(make_engine(tmp_path, kernel)))
        before = kernel.snapshot()
        assert await make_engine(tmp_path, kernel).start() == 0
        kernel.wipe()
        assert await make_engine(tmp_path, kernel).start() > 0
        assert kernel.snapshot() == before

    run(scenario())


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda e: e.create_disk("bad name", 1 << 20), InvalidArgument),
        (lambda e: e.create_disk("d2", 1000), InvalidArgument),
        (lambda e: e.create_disk("d2", (1 << 20) + 1), InvalidArgument),
        (lambda e: e.create_disk("d2", 1 << 20, "relative/path.img"), InvalidArgument),
        (lambda e: e.create_disk("d2", 1 << 20, "/nonexistent-dir/x.img"), InvalidArgument),
        (lambda e: e.create_disk("d2", 1 << 20, "/tmp/a,b.img"), InvalidArgument),
        (lambda e: e.create_disk("d1", 1 << 20), AlreadyExists),
        (lambda e: e.create_target("t1"), AlreadyExists),
        (lambda e: e.create_target("t2", iqn="iqn.2003-01.org.linux-iscsi.applianced:t1"), AlreadyExists),
        (lambda e: e.create_target("t2", iqn="iqn.bogus"), InvalidArgument),
        (lambda e: e.create_target("t2", description="x" * 300), InvalidArgument),
        (lambda e: e.add_lun("t1", "nope"), NotFound),
        (lambda e: e.add_lun("nope", "d1"), NotFound),
        (lambda e: e.add_lun("t1", "d1"), AlreadyExists),
        (lambda e: e.modify_disk("d1", description="x" * 300), InvalidArgument),
        (lambda e: e.modify_disk("nope", shared=True), NotFound),
        (lambda e: e.add_acl("t1", INITIATOR.upper()), AlreadyExists),
        (lambda e: e.add_acl("t1", "not-an-iqn"), InvalidArgument),
        (lambda e: e.remove_lun("t1", 7), NotFound),
        (lambda e: e.remove_acl("t1", "iqn.1994-05.com.redhat:other"), NotFound),
        (lambda e: e.create_portal("10.1.0.5", 3260), AlreadyExists),
        (lambda e: e.create_portal("192.0.2.77", 3260), InvalidArgument),
        (lambda e: e.create_portal("0.0.0.0", 3260), InvalidArgument),
        (lambda e: e.create_portal("10.1.0.5", 0), InvalidArgument),
        (lambda e: e.create_portal("not-an-ip", 3260), InvalidArgument),
        (lambda e: e.delete_portal("10.9.9.9:3260"), NotFound),
        (lambda e: e.delete_disk("d1"), Busy),
        (lambda e: e.delete_disk("nope"), NotFound),
        (lambda e: e.delete_target("nope"), NotFound),
    ],
)
def test_bad_input_gets_a_named_error_and_changes_nothing(tmp_path, call, error):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        config, kernel, files = engine.config, engine.kernel.snapshot(), sorted(tmp_path.rglob("*"))
        state_bytes = engine.store.path.read_bytes()
        with pytest.raises(error):
            await call(engine)
        assert engine.config == config
        assert engine.kernel.snapshot() == kernel
        assert engine.store.path.read_bytes() == state_bytes
        assert sorted(tmp_path.rglob("*")) == files

    run(scenario())


def test_kernel_failure_rolls_back_kernel_state_and_file(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await engine.create_disk("d1", 1 << 20)
        before = kernel.snapshot()
        kernel.fail_on = "SetTpgEnabled"
        with pytest.raises(KernelError):
            await engine.create_target("t1")
        assert kernel.snapshot() == before
        assert "t1" not in engine.store.load().targets
        kernel.fail_on = "CreateStorageObject"
        with pytest.raises(KernelError):
            await engine.create_disk("d2", 1 << 20)
        assert not (tmp_path / "state" / "disks" / "d2.img").exists()
        assert kernel.snapshot() == before

    run(scenario())


class CountingKernel(FakeKernel):
    def __init__(self) -> None:
        super().__init__()
        self.observed = 0

    def observe(self, *args):
        self.observed += 1
        return super().observe(*args)


class Mirrors(NoReplication):
    """Replication's view with d1 served through a mirror, once ``lower`` is set."""

    lower: str | None = None

    def lowers(self):
        return {"d1": self.lower} if self.lower else {}

    def mirrored(self):
        return ["d1"] if self.lower else []


def test_a_commit_plans_from_what_was_applied_and_reads_the_kernel_only_after_a_failure(tmp_path):
    kernel = CountingKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        engine.replication = mirrors = Mirrors()
        mirrors.lower = "/dev/md0"  # a takeover promoted d1's copy: it is served through md now
        kernel.observed = 0
        await engine.set_targets_enabled(["t1"], False)
        assert kernel.observed == 0, "planned from the last applied rendering"
        assert kernel.disk_devices["d1"].lower == "/dev/md0"
        assert not kernel.targets["iqn.2003-01.org.linux-iscsi.applianced:t1"].enabled
        # A change that failed half-way leaves the kernel unknown: the roll-back reads it
        # back and restores the previous rendering, which the next commit plans from.
        kernel.fail_on = "SetTpgEnabled"
        with pytest.raises(KernelError):
            await engine.set_targets_enabled(["t1"], True)
        assert kernel.observed == 1
        kernel.fail_on = None
        await engine.set_targets_enabled(["t1"], True)
        assert kernel.observed == 1
        assert kernel.targets["iqn.2003-01.org.linux-iscsi.applianced:t1"].enabled

    run(scenario())


class Exporting(Mirrors):
    """``Mirrors`` whose d1 has an NBD export for the peer, once ``exported``."""

    exported = False

    def filters(self):
        export = firewall.PortalFilter("10.9.0.1", 10809, (ipaddress.ip_network("10.9.0.2/32"),), (), "export d1")
        return {export.key: export} if self.exported else {}


def test_a_role_changes_refresh_plans_from_what_was_applied_and_reads_the_rules_only_when_they_change(tmp_path):
    kernel, fw = CountingKernel(), FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel, fw))
        await populate(engine)
        engine.replication = mirrors = Exporting()
        kernel.observed, looks = 0, fw.looks
        mirrors.lower = "/dev/md0"  # a switchover's new source: d1 served through md
        await engine.refresh_replication(read_back=False)
        assert (kernel.observed, fw.looks) == (0, looks), "neither configfs nor nft read back"
        assert kernel.disk_devices["d1"].lower == "/dev/md0"
        mirrors.exported = True  # the old source: its export's rule, written
        await engine.refresh_replication(read_back=False)
        assert (kernel.observed, fw.looks) == (0, looks + 1)
        assert "applianced export d1 10.9.0.1:10809" in json.dumps(fw.ruleset)
        # Any other refresh reads both back, and puts back what another tool removed.
        fw.ruleset = ()
        await engine.refresh_replication()
        assert (kernel.observed, fw.looks) == (1, looks + 2)
        assert "applianced export d1 10.9.0.1:10809" in json.dumps(fw.ruleset)

    run(scenario())


class Copies(NoReplication):
    """Replication's view on a passive node: d1 is the peer's copy, whose prepared array runs
    once ``prepared``; ``promoted`` (a takeover) serves d1 from that array."""

    prepared = False
    promoted = False

    def unserved(self):
        return {} if self.promoted else {"d1": "the peer's copy"}

    def lowers(self):
        return {"d1": "/dev/md0"} if self.promoted else {}

    def standby(self):
        return {"d1": "/dev/md0"} if self.prepared and not self.promoted else {}

    def mirrored(self):
        return ["d1"]


def test_a_prepared_copy_waits_with_its_luns_made_unless_it_holds_reservations(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.set_targets_enabled(["t1"], False)  # the passive node's copy of t1
        iqn = engine.config.targets["t1"].iqn
        engine.replication = copies = Copies()
        await engine.refresh_replication()
        assert "d1" not in kernel.storage_objects and kernel.targets[iqn].luns == {}
        copies.prepared = True
        await engine.refresh_replication()
        assert kernel.disk_devices["d1"].lower == "/dev/md0"
        assert kernel.targets[iqn].luns == {0: "d1"} and not kernel.targets[iqn].enabled
        # LIO reads reservations only into a backstore it makes: the copy's waits for them.
        await engine.keep_reservations("d1", "PR_REG_START: 0\nPR_REG_END: 0\n")
        assert "d1" not in kernel.storage_objects and kernel.targets[iqn].luns == {}
        await engine.keep_reservations("d1", "No Registrations or Reservations\n")  # LIO's text once they go
        assert kernel.targets[iqn].luns == {0: "d1"}
        # The takeover: the copy served from the array its LUN already sits on.
        copies.promoted = True
        kernel.applied.clear()
        await engine.set_targets_enabled(["t1"], True)
        assert kernel.applied == [SetTpgEnabled(iqn, True)]
        return engine

    engine = run(scenario())
    # A restart finds the reservations kept: nothing is made in advance for them.
    kernel.keep_reservations(engine.config.disks["d1"].serial, "PR_REG_START: 0\nPR_REG_END: 0\n")

    async def restarted_as_the_passive_node():
        again = make_engine(tmp_path, kernel)
        again.replication = copies = Copies()
        copies.prepared = True
        await again.start()
        await again.set_targets_enabled(["t1"], False)

    run(restarted_as_the_passive_node())
    assert "d1" not in kernel.storage_objects


def test_state_write_failure_rolls_back_the_kernel(tmp_path, monkeypatch):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        before = engine.kernel.snapshot()

        def refuse(config):
            raise StateError("disk full")

        monkeypatch.setattr(engine.store, "save", refuse)
        with pytest.raises(StateError):
            await engine.create_target("t1")
        assert engine.kernel.snapshot() == before
        assert "t1" not in engine.config.targets

    run(scenario())


def test_changes_that_disrupt_sessions_need_force(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        iqn = engine.config.targets["t1"].iqn
        kernel.session_list = [Session(iqn, INITIATOR, "LOGGED_IN", ("10.1.0.9:40000",))]
        for call in (
            engine.delete_target("t1"),
            engine.remove_lun("t1", 0),
            engine.remove_acl("t1", INITIATOR),
        ):
            with pytest.raises(Busy, match=INITIATOR):
                await call
        await engine.remove_lun("t1", 0, force=True)
        await engine.delete_target("t1", force=True)
        assert iqn not in kernel.snapshot().targets

    run(scenario())


def test_sessions_of_another_target_do_not_count(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.create_target("t2")
        await engine.add_acl("t2", INITIATOR)
        kernel.session_list = [Session(engine.config.targets["t2"].iqn, INITIATOR, "LOGGED_IN", ())]
        assert (await engine.sessions(engine.config.targets["t1"].iqn)).sessions == ()
        with pytest.raises(NotFound, match="no session"):
            await engine.force_logout("t1", INITIATOR)
        await engine.remove_acl("t1", INITIATOR)
        with pytest.raises(Busy, match=INITIATOR):
            await engine.remove_acl("t2", INITIATOR)

    run(scenario())


def test_a_disk_is_exported_by_one_target_unless_shared(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.create_target("t2")
        with pytest.raises(Busy, match="already exported by target 't1'"):
            await engine.add_lun("t2", "d1")
        await engine.modify_disk("d1", shared=True)
        await engine.add_lun("t2", "d1")
        assert [t.luns[0].disk for t in engine.config.targets.values()] == ["d1", "d1"]
        with pytest.raises(Busy, match="t1, t2"):
            await engine.modify_disk("d1", shared=False)
        assert engine.store.load().disks["d1"].shared
        await engine.remove_lun("t2", 0)
        await engine.modify_disk("d1", shared=False)
        assert not engine.store.load().disks["d1"].shared

    run(scenario())


def test_lun_numbers_default_to_lowest_free(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await engine.create_target("t1")
        for name in ("a", "b", "c", "d"):
            await engine.create_disk(name, 1 << 20)
        assert (await engine.add_lun("t1", "a", 1)).number == 1
        assert (await engine.add_lun("t1", "b")).number == 0
        assert (await engine.add_lun("t1", "c")).number == 2
        with pytest.raises(InvalidArgument):
            await engine.add_lun("t1", "d", 256)

    run(scenario())


def test_delete_disk_keeps_file_unless_asked(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        kept = await engine.create_disk("kept", 1 << 20)
        gone = await engine.create_disk("gone", 1 << 20)
        await engine.delete_disk("kept")
        await engine.delete_disk("gone", remove_file=True)
        return kept, gone

    kept, gone = run(scenario())
    assert (tmp_path / "state" / "disks" / "kept.img").exists()
    assert not (tmp_path / "state" / "disks" / "gone.img").exists()
    assert kept.serial != gone.serial


def test_reload_applies_an_edited_state_file(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        other = make_engine(tmp_path / "other")
        await other.start()
        # The file of an empty node replaces ours: reload must remove what it no longer lists.
        engine.store.save(other.config)
        assert await engine.reload() > 0
        assert engine.kernel.snapshot().targets == {}
        assert engine.config.targets == {}

    run(scenario())


def test_modify_target_settings_reach_the_kernel(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        old_iqn = engine.config.targets["t1"].iqn
        parameters = engine.kernel.snapshot().targets[old_iqn].parameters
        assert (parameters["TargetAlias"], parameters["HeaderDigest"]) == ("t1", "CRC32C,None")
        assert (parameters["DataPDUInOrder"], parameters["DataSequenceInOrder"]) == ("Yes", "Yes")
        assert int(parameters["MaxBurstLength"]) >= int(parameters["FirstBurstLength"])
        await engine.modify_target("t1", header_digest="required", data_digest="off")
        parameters = engine.kernel.snapshot().targets[old_iqn].parameters
        assert (parameters["HeaderDigest"], parameters["DataDigest"]) == ("CRC32C", "None")
        with pytest.raises(InvalidArgument, match="digest"):
            await engine.modify_target("t1", header_digest="md5")
        await engine.modify_target("t1", description="mail", alias="Mail store", enabled=False)
        kernel = engine.kernel.snapshot().targets[old_iqn]
        assert (kernel.parameters["TargetAlias"], kernel.enabled) == ("Mail store", False)
        await engine.modify_target("t1", iqn="iqn.2026-11.com.example:mail", enabled=True)
        kernel = engine.kernel.snapshot()
        assert old_iqn not in kernel.targets
        moved = kernel.targets["iqn.2026-11.com.example:mail"]
        assert moved.enabled and moved.luns == {0: "d1"} and set(moved.acls) == {INITIATOR}
        assert engine.store.load().targets["t1"].description == "mail"

    run(scenario())


def test_disruptive_target_changes_need_force(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.create_target("t2")
        iqn = engine.config.targets["t1"].iqn
        kernel.session_list = [Session(iqn, INITIATOR, "LOGGED_IN", ())]
        before = kernel.snapshot()
        with pytest.raises(Busy, match="changing its IQN"):
            await engine.modify_target("t1", iqn="iqn.2026-11.com.example:new")
        with pytest.raises(Busy, match="disabling it"):
            await engine.modify_target("t1", enabled=False)
        with pytest.raises(AlreadyExists):
            await engine.modify_target("t1", iqn=engine.config.targets["t2"].iqn, force=True)
        with pytest.raises(InvalidArgument):
            await engine.modify_target("t1", alias="x" * 256)
        assert kernel.snapshot() == before
        await engine.modify_target("t1", description="harmless while in use")
        await engine.modify_target("t1", enabled=False, force=True)
        assert not kernel.snapshot().targets[iqn].enabled

    run(scenario())


SECRET, MUTUAL = "s3cret-s3cret", "other-s3cret!"


def test_chap_resolves_default_user_names_and_reaches_the_kernel(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.add_acl("t1", "iqn.1994-05.com.redhat:client2")
        iqn = engine.config.targets["t1"].iqn
        await engine.set_target_chap("t1", Chap(secret=SECRET, mutual_secret=MUTUAL))
        await engine.set_acl_chap("t1", "iqn.1994-05.com.redhat:client2", Chap("alice", "alice-secret1"))
        acls = engine.kernel.snapshot().targets[iqn].acls
        assert acls[INITIATOR].auth == Chap(INITIATOR, SECRET, iqn, MUTUAL)
        assert acls["iqn.1994-05.com.redhat:client2"].auth == Chap("alice", "alice-secret1")
        await engine.set_target_chap("t1", None)
        acls = engine.kernel.snapshot().targets[iqn].acls
        assert acls[INITIATOR].auth is None
        assert acls["iqn.1994-05.com.redhat:client2"].auth == Chap("alice", "alice-secret1")
        await engine.set_discovery_chap(Chap("disco", SECRET))
        assert engine.kernel.snapshot().discovery_auth == Chap("disco", SECRET)
        assert engine.store.load() == engine.config

    run(scenario())


@pytest.mark.parametrize(
    ("chap", "message"),
    [
        (Chap(secret="short"), "12 to 16"),
        (Chap(secret="x" * 17), "12 to 16"),
        (Chap(secret="has a space!!"), "without spaces"),
        (Chap(secret="ünicode-secret"), "printable ASCII"),
        (Chap(mutual_secret=MUTUAL), "mutual CHAP alone"),
        (Chap(secret=SECRET, mutual_secret=SECRET), "must differ"),
        (Chap(secret=SECRET, mutual_user="bob"), "needs a mutual secret"),
        (Chap(user="u" * 129, secret=SECRET), "at most 128 bytes"),
    ],
)
def test_bad_chap_is_refused_without_echoing_secrets(tmp_path, chap, message):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        before = engine.kernel.snapshot()
        with pytest.raises(InvalidArgument, match=message) as raised:
            await engine.set_target_chap("t1", chap)
        for secret in (chap.secret, chap.mutual_secret):
            if len(secret) > 3:
                assert secret not in str(raised.value)
        assert engine.kernel.snapshot() == before

    run(scenario())


def test_secrets_stay_out_of_logs_and_kernel_errors(tmp_path, caplog):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.set_target_chap("t1", Chap(secret=SECRET, mutual_secret=MUTUAL))
        kernel.fail_on = "SetAclAuth"
        with pytest.raises(KernelError) as raised:
            await engine.set_target_chap("t1", Chap(secret="another-secret"))
        return raised.value

    with caplog.at_level(logging.DEBUG):
        error = run(scenario())
    for secret in (SECRET, MUTUAL, "another-secret"):
        assert secret not in caplog.text
        assert secret not in str(error)
    assert repr(Chap("u", SECRET)) == "Chap(user='u', mutual_user='')"


def test_extend_grows_file_and_kernel_and_refuses_shrink(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.extend_disk("d1", 128 << 20)
        assert engine.kernel.snapshot().disk_devices["d1"].size == 128 << 20
        assert diskfile.read_marker(tmp_path / "state" / "disks" / "d1.img").size == 128 << 20
        with pytest.raises(InvalidArgument, match="shrinking"):
            await engine.extend_disk("d1", 64 << 20)
        assert engine.kernel.snapshot().disk_devices["d1"].size == 128 << 20

    run(scenario())


def test_failed_extend_shrinks_the_file_back(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        kernel.fail_on = "ReloadDiskDevice"
        with pytest.raises(KernelError):
            await engine.extend_disk("d1", 128 << 20)
        assert diskfile.read_marker(tmp_path / "state" / "disks" / "d1.img").size == 64 << 20
        assert engine.config.disks["d1"].size == 64 << 20

    run(scenario())


def test_read_only_luns_and_write_back_disks_reach_the_kernel(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.create_disk("fast", 1 << 20, write_back=True)
        await engine.add_lun("t1", "fast", read_only=True)
        kernel = engine.kernel.snapshot()
        # Write-back: the loop device under the disk goes through this node's page cache.
        assert not kernel.disk_devices["fast"].direct_io
        assert kernel.disk_devices["d1"].direct_io
        mapped = kernel.targets[engine.config.targets["t1"].iqn].acls[INITIATOR].mapped_luns
        assert {(m.mapped_lun, m.write_protect) for m in mapped} == {(0, False), (1, True)}

    run(scenario())


def test_import_keeps_identity_and_refuses_foreign_files_and_copies(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        original = await engine.create_disk("moving", 2 << 20, description="to be moved")
        await engine.delete_disk("moving")
        imported = await engine.import_disk(original.path, name="moved")
        assert (imported.serial, imported.size, imported.path) == (original.serial, original.size, original.path)
        assert engine.kernel.snapshot().storage_objects["moved"].serial == original.serial
        copy = tmp_path / "copy.img"
        copy.write_bytes(Path(original.path).read_bytes())
        with pytest.raises(AlreadyExists, match="serial"):
            await engine.import_disk(str(copy), name="copy")
        foreign = tmp_path / "foreign.img"
        foreign.write_bytes(bytes(1 << 20))
        with pytest.raises(InvalidArgument, match="not created by applianced"):
            await engine.import_disk(str(foreign))
        with pytest.raises(InvalidArgument, match="does not exist"):
            await engine.import_disk(str(tmp_path / "missing.img"))

    run(scenario())


def test_boot_profiles_render_dhcp_settings_and_protect_what_they_use(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        client = await engine.create_boot_client("pc1", "t1", INITIATOR, mac="00-15-17-0B-0E-F6")
        assert (client.address, client.port, client.lun) == ("10.1.0.5", 3260, 0)
        profile = bootprofile.profile_for(client, engine.config.targets["t1"])
        iqn = engine.config.targets["t1"].iqn
        assert bootprofile.root_path(profile.primary) == f"iscsi:10.1.0.5:6:3260:0:{iqn}"
        with pytest.raises(InvalidArgument, match="255"):
            await engine.create_boot_client("pc2", "t1", INITIATOR, lun=255)
        with pytest.raises(NotFound, match="no LUN 7"):
            await engine.create_boot_client("pc2", "t1", INITIATOR, lun=7)
        with pytest.raises(NotFound, match="add its ACL first"):
            await engine.create_boot_client("pc2", "t1", "iqn.1994-05.com.redhat:stranger")
        two = await engine.create_boot_client(
            "pc3", "t1", INITIATOR, portal="[fd00::5]:3261", secondary_portal="10.1.0.6"
        )
        assert (two.address, two.port, two.secondary_address) == ("fd00::5", 3261, "10.1.0.6")
        configs = bootprofile.render_all(bootprofile.profile_for(two, engine.config.targets["t1"]))
        assert configs == {"root-path": f"iscsi:[fd00::5]:6:3261:0:{iqn}"}
        for call in (
            engine.delete_target("t1", force=True),
            engine.remove_lun("t1", 0, force=True),
            engine.remove_acl("t1", INITIATOR, force=True),
        ):
            with pytest.raises(Busy, match="pc1"):
                await call
        await engine.delete_boot_client("pc1")
        await engine.delete_boot_client("pc3")
        await engine.remove_acl("t1", INITIATOR)
        assert engine.store.load() == engine.config

    run(scenario())


def test_boot_profiles_serve_chosen_firmware_and_follow_the_acl_chap(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        for firmware, mac, match in (("bios", "", "firmware"), ("uefi", "", "MAC")):
            with pytest.raises(InvalidArgument, match=match):
                await engine.create_boot_client("pc1", "t1", INITIATOR, firmware=firmware, mac=mac)
        assert engine.config.boot_clients == {} and engine.store.load() == engine.config
        client = await engine.create_boot_client("pc1", "t1", INITIATOR, mac="52:54:00:12:34:56", firmware="ipxe")
        assert client.firmware == "ipxe" and engine.store.load().boot_clients["pc1"] == client
        await engine.set_acl_chap("t1", INITIATOR, Chap(secret=SECRET, mutual_secret=MUTUAL))
        profile = bootprofile.profile_for(client, engine.config.targets["t1"])
        # The default user names, as the kernel's ACL has them.
        assert profile.chap == Chap(INITIATOR, SECRET, engine.config.targets["t1"].iqn, MUTUAL)
        assert SECRET in bootprofile.dnsmasq(profile, secrets=True)
        assert SECRET not in bootprofile.dnsmasq(profile)
        # Long CHAP user names would no longer fit iPXE's option 175: refused, nothing changes.
        before = engine.config
        with pytest.raises(InvalidArgument, match="option 175"):
            await engine.set_acl_chap("t1", INITIATOR, Chap("u" * 128, SECRET, "m" * 100, MUTUAL))
        assert engine.config == before and engine.store.load() == before

    run(scenario())


def test_export_wipe_import_round_trip(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.set_target_chap("t1", Chap(secret=SECRET))
        exported = json.loads(json.dumps(engine.export_configuration()))
        before_kernel, before_config = kernel.snapshot(), engine.config
        # A new node (own id, empty kernel) with the same disk files takes the export.
        kernel.wipe()
        (tmp_path / "state" / "state.json").unlink()
        fresh = await started(make_engine(tmp_path, kernel))
        await fresh.import_configuration(json.dumps(exported))
        assert kernel.snapshot() == before_kernel
        assert fresh.config == dataclasses.replace(before_config, node_id=fresh.config.node_id)

    run(scenario())


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda d: d.update(format="other"), InvalidArgument, "not an applianced configuration"),
        (lambda d: d.update(version=9), InvalidArgument, "version 9"),
        (lambda d: d["targets"][0].update(iqn="iqn.bogus"), InvalidArgument, "IQN"),
        (lambda d: d["disks"][0].update(serial="00000000-0000-4000-8000-000000000000"), InvalidArgument, "holds disk"),
        (lambda d: d["targets"][0]["luns"].append({"number": 1, "disk": "nope"}), InvalidArgument, "unknown"),
        (lambda d: d["portals"].append({"address": "192.0.2.99", "port": 3260}), InvalidArgument, "not configured"),
        (lambda d: d.update(discovery_chap={"user": "", "secret": SECRET}), InvalidArgument, "user name"),
    ],
)
def test_bad_imports_change_nothing(tmp_path, mutate, error, message):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        document = json.loads(json.dumps(engine.export_configuration()))
        mutate(document)
        before, kernel = engine.config, engine.kernel.snapshot()
        with pytest.raises(error, match=message):
            await engine.import_configuration(json.dumps(document))
        assert (engine.config, engine.kernel.snapshot(), engine.store.load()) == (before, kernel, before)

    run(scenario())


def test_import_that_drops_a_target_in_use_needs_force(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        document = engine.export_configuration()
        document["targets"] = []
        kernel.session_list = [Session(engine.config.targets["t1"].iqn, INITIATOR, "LOGGED_IN", ())]
        with pytest.raises(Busy):
            await engine.import_configuration(json.dumps(document))
        await engine.import_configuration(json.dumps(document), force=True)
        assert engine.config.targets == {}

    run(scenario())


def saveconfig(disk_path, size):
    """A saveconfig.json as targetcli/targetctl write it (rtslib's dump)."""
    return {
        "fabric_modules": [{"name": "iscsi", "discovery_enable_auth": False}],
        "storage_objects": [
            {
                "plugin": "fileio",
                "name": "legacy",
                "dev": str(disk_path),
                "size": size,
                "write_back": False,
                "wwn": "5f0c4a52-7a1d-4c1b-9d0e-8c9a0f3b2a11",
                "aio": False,
                "attributes": {},
            }
        ],
        "targets": [
            {
                "fabric": "iscsi",
                "wwn": "iqn.2003-01.org.linux-iscsi.oldhost.x8664:sn.1234567890ab",
                "tpgs": [
                    {
                        "tag": 1,
                        "enable": True,
                        "attributes": {"authentication": 1, "generate_node_acls": 0},
                        "parameters": {"TargetAlias": "LIO Target"},
                        "luns": [{"index": 0, "storage_object": "/backstores/fileio/legacy", "alias": "x"}],
                        "node_acls": [
                            {
                                "node_wwn": INITIATOR,
                                "chap_userid": "legacy-user",
                                "chap_password": "legacy-secret",
                                "mapped_luns": [{"index": 0, "tpg_lun": 0, "write_protect": False}],
                            }
                        ],
                        "portals": [{"ip_address": "0.0.0.0", "port": 3260, "iser": False, "offload": False}],
                    }
                ],
            }
        ],
    }


def test_targetcli_import_adopts_files_and_keeps_identity(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        legacy = tmp_path / "legacy.img"
        legacy.write_bytes(b"data" * 1024 + bytes((1 << 20) - 4096))
        part = await engine.import_targetcli(json.dumps(saveconfig(legacy, 1 << 20)))
        (target,) = part.targets.values()
        assert target.name == "sn.1234567890ab"
        assert target.acls[0].chap == Chap("legacy-user", "legacy-secret")
        disk = engine.config.disks["legacy"]
        assert disk.serial == "5f0c4a52-7a1d-4c1b-9d0e-8c9a0f3b2a11"
        assert legacy.read_bytes()[:4096] == b"data" * 1024, "the LUN's bytes are untouched"
        assert diskfile.read_marker(legacy).serial == disk.serial
        assert engine.config.portals == (Portal("0.0.0.0", 3260),)
        iqn = "iqn.2003-01.org.linux-iscsi.oldhost.x8664:sn.1234567890ab"
        assert engine.kernel.snapshot().targets[iqn].luns == {0: "legacy"}

    run(scenario())


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda d: d["storage_objects"][0].update(plugin="block"), NotSupported, "block/legacy"),
        (lambda d: d["targets"][0]["tpgs"][0]["attributes"].update(generate_node_acls=1), NotSupported, "demo"),
        (lambda d: d["targets"][0]["tpgs"].append({}), NotSupported, "2 TPGs"),
        (lambda d: d["targets"][0].update(fabric="loopback"), NotSupported, "loopback"),
        (lambda d: d["storage_objects"][0].update(size=2 << 20), InvalidArgument, "not adopting"),
        (lambda d: d.clear(), InvalidArgument, "not a targetcli"),
        # Wrong types are named by their field, before any file is touched.
        (lambda d: d["storage_objects"][0].update(size="1M"), InvalidArgument, r"\$\.storage_objects\[0\]\.size"),
        (lambda d: d["targets"][0].update(tpgs="tpg1"), InvalidArgument, r"\$\.targets\[0\]\.tpgs"),
        (lambda d: d["targets"][0]["tpgs"][0]["node_acls"][0].pop("node_wwn"), InvalidArgument, "node_wwn"),
        (lambda d: d["targets"][0]["tpgs"][0]["luns"][0].update(index=None), InvalidArgument, "index"),
        (lambda d: d["targets"][0]["tpgs"][0]["attributes"].update(authentication="yes"), InvalidArgument, "'yes'"),
    ],
)
def test_targetcli_import_refuses_what_it_cannot_represent(tmp_path, mutate, error, message):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        legacy = tmp_path / "legacy.img"
        legacy.write_bytes(bytes(1 << 20))
        document = saveconfig(legacy, 1 << 20)
        mutate(document)
        with pytest.raises(error, match=message):
            await engine.import_targetcli(json.dumps(document))
        assert engine.config.targets == {} and engine.config.disks == {}
        assert legacy.read_bytes() == bytes(1 << 20), "a refused import leaves the file alone"

    run(scenario())


def test_force_logout_bounces_the_acl_and_leaves_the_configuration(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await populate(engine)
        await engine.set_target_chap("t1", Chap(secret=SECRET))
        with pytest.raises(NotFound, match="no session"):
            await engine.force_logout("t1", INITIATOR)
        iqn = engine.config.targets["t1"].iqn
        kernel.session_list = [Session(iqn, INITIATOR, "LOGGED_IN", ())]
        before, config = kernel.snapshot(), engine.config
        kernel.applied.clear()
        await engine.force_logout("t1", INITIATOR)
        assert [type(a).__name__ for a in kernel.applied][:2] == ["RemoveAcl", "AddAcl"]
        assert kernel.snapshot() == before and engine.config == config

    run(scenario())


def test_portals_can_serve_only_some_targets(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.create_target("t2")
        await engine.create_portal("fd00::5", 3261, ["t2"])
        kernel = engine.kernel.snapshot().targets
        t1, t2 = engine.config.targets["t1"].iqn, engine.config.targets["t2"].iqn
        assert kernel[t1].portals == {("10.1.0.5", 3260)}
        assert kernel[t2].portals == {("10.1.0.5", 3260), ("fd00::5", 3261)}
        with pytest.raises(NotFound):
            await engine.create_portal("10.1.0.5", 3262, ["nope"])
        with pytest.raises(Busy, match="serve only target 't2'"):
            await engine.delete_target("t2")
        await engine.create_portal("10.1.0.5", 3263, ["t1", "t2"])
        await engine.delete_portal("[fd00::5]:3261")
        await engine.delete_target("t2")
        assert engine.config.portal("10.1.0.5:3263").targets == ("t1",)
        assert engine.store.load() == engine.config

    run(scenario())
