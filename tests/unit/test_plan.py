"""Planning LIO changes: correctness against the fake kernel's semantics, and ordering."""

import dataclasses
import random

from applianced.iscsi.kernel import plan as p
from applianced.iscsi.kernel.model import KernelConfig, render
from applianced.state import Acl, Chap, Config, Disk, Lun, Portal, Target
from tests.support.fake_kernel import FakeKernel

CHAPS = [None, Chap(secret="secret-number-1"), Chap("u", "secret-number-2", "m", "secret-number-3")]


def random_config(rng: random.Random) -> Config:
    config = Config(node_id="n")
    disks = [f"d{i}" for i in range(rng.randint(0, 5))]
    for name in disks:
        size = rng.choice([1, 2]) << 20
        config = config.with_disk(Disk(name, f"/srv/{name}.img", size, f"serial-{name}", write_back=rng.random() < 0.2))
    for t in range(rng.randint(0, 4)):
        luns = tuple(
            Lun(n, d, read_only=rng.random() < 0.3) for n, d in enumerate(rng.sample(disks, rng.randint(0, len(disks))))
        )
        acls = tuple(
            Acl(f"iqn.1994-05.com.example:c{i}", rng.choice(CHAPS)) for i in rng.sample(range(4), rng.randint(0, 3))
        )
        config = config.with_target(
            Target(
                f"t{t}",
                f"iqn.2003-01.org.example:t{t}",
                alias=rng.choice(["", "Mail store"]),
                enabled=rng.random() < 0.8,
                luns=luns,
                acls=acls,
                chap=rng.choice(CHAPS),
            )
        )
    portals = rng.sample(
        [Portal("10.0.0.1", 3260), Portal("fd00::1", 3260), Portal("10.0.0.1", 3261, targets=("t0",))],
        rng.randint(0, 3),
    )
    return Config(config.node_id, config.iqn_prefix, config.disks, config.targets, tuple(portals), rng.choice(CHAPS))


def kernel_holding(config: KernelConfig) -> FakeKernel:
    kernel = FakeKernel()
    kernel.storage_objects = dict(config.storage_objects)
    kernel.targets = dict(config.targets)
    kernel.discovery_auth = config.discovery_auth
    return kernel


def test_plan_turns_any_configuration_into_any_other():
    rng = random.Random(20261121)
    for _ in range(400):
        before, after = render(random_config(rng)), render(random_config(rng))
        kernel = kernel_holding(before)
        kernel.apply(p.plan(before, after))
        assert kernel.snapshot() == after
        assert p.plan(kernel.snapshot(), after) == []


def test_identical_configurations_need_no_change():
    config = render(random_config(random.Random(7)))
    assert p.plan(config, config) == []


def test_new_target_is_enabled_last_and_backstores_come_first():
    config = Config(node_id="n").with_disk(Disk("d", "/srv/d.img", 1 << 20, "s"))
    config = config.with_target(
        Target("t", "iqn.2003-01.org.example:t", luns=(Lun(0, "d"),), acls=(Acl("iqn.1994-05.com.example:c"),))
    )
    actions = p.plan(KernelConfig(), render(config))
    assert isinstance(actions[0], p.CreateStorageObject)
    assert actions[-1] == p.SetTpgEnabled("iqn.2003-01.org.example:t", True)
    kinds = [type(a).__name__ for a in actions]
    assert kinds.index("AddLun") < kinds.index("MapLun")
    assert kinds.index("AddAcl") < kinds.index("MapLun")


def test_replacing_a_backstore_remaps_its_luns():
    disk = Disk("d", "/srv/d.img", 1 << 20, "s")
    config = Config(node_id="n").with_disk(disk)
    config = config.with_target(
        Target("t", "iqn.2003-01.org.example:t", luns=(Lun(0, "d"),), acls=(Acl("iqn.1994-05.com.example:c"),))
    )
    moved = config.with_disk(Disk("d", "/srv/elsewhere.img", 1 << 20, "s"))
    actions = p.plan(render(config), render(moved))
    kinds = [type(a).__name__ for a in actions]
    assert kinds == ["UnmapLun", "RemoveLun", "DeleteStorageObject", "CreateStorageObject", "AddLun", "MapLun"]


def test_growing_a_backstore_is_done_in_place_but_shrinking_replaces_it():
    config = Config(node_id="n").with_disk(Disk("d", "/srv/d.img", 1 << 20, "s"))
    config = config.with_target(Target("t", "iqn.2003-01.org.example:t", luns=(Lun(0, "d"),)))
    grown = config.with_disk(Disk("d", "/srv/d.img", 2 << 20, "s"))
    assert p.plan(render(config), render(grown)) == [p.GrowStorageObject("d", 2 << 20)]
    kinds = [type(a).__name__ for a in p.plan(render(grown), render(config))]
    assert "DeleteStorageObject" in kinds and "GrowStorageObject" not in kinds


def test_unrelated_changes_do_not_touch_other_targets():
    base = Config(node_id="n").with_target(Target("a", "iqn.2003-01.org.example:a"))
    changed = base.with_target(Target("b", "iqn.2003-01.org.example:b"))
    actions = p.plan(render(base), render(changed))
    assert all(getattr(a, "iqn", None) == "iqn.2003-01.org.example:b" for a in actions)


def test_a_copy_standing_by_has_its_luns_made_only_in_disabled_targets():
    copy = Disk("c1", "/srv/c1.img", 1 << 20, "s1", backstore="dm")
    plain = Disk("c2", "/srv/c2.img", 1 << 20, "s2")  # not a device-mapper disk: never in advance
    config = Config(node_id="n").with_disk(copy).with_disk(plain)
    acl = Acl("iqn.1994-05.com.example:c")
    waiting = Target("t", "iqn.2003-01.org.example:t", enabled=False, luns=(Lun(0, "c1"), Lun(1, "c2")), acls=(acl,))
    config = config.with_target(waiting)
    unserved = {"c1", "c2"}
    standby = {"c1": "/run/applianced/block/applianced-mirror-c1", "c2": "/dev/md9"}

    rendered = render(config, unserved, {}, standby)
    assert set(rendered.storage_objects) == {"c1"}
    assert rendered.disk_devices["c1"].lower == standby["c1"]
    assert rendered.targets[waiting.iqn].luns == {0: "c1"}
    assert {m.mapped_lun for m in rendered.targets[waiting.iqn].acls[acl.initiator].mapped_luns} == {0}
    # Without the prepared array, the copy is not served at all.
    assert render(config, unserved).storage_objects == {}
    # An enabled target never reaches a copy, prepared or not.
    enabled = render(config.with_target(dataclasses.replace(waiting, enabled=True)), unserved, {}, standby)
    assert enabled.targets[waiting.iqn].luns == {} and enabled.storage_objects == {}
    # Promoted (served through the same array): the same objects, so only the TPG changes.
    promoted = render(config.with_target(dataclasses.replace(waiting, enabled=True)), {"c2"}, {"c1": standby["c1"]})
    assert p.plan(rendered, promoted) == [p.SetTpgEnabled(waiting.iqn, True)]
