"""Source allow-lists: entries, the nft rule set rendered from a configuration, and the engine.

The rule set is a pure function of the configuration and the addresses its DNS names
resolve to; these tests pin it. The engine runs with the in-memory kernel and firewall;
what nftables does with the rules is proven in tests/netns and tests/vm.
"""

import dataclasses
import ipaddress
import json
import logging

import pytest

from applianced.errors import Busy, InvalidArgument, KernelError, NotFound
from applianced.iscsi import firewall
from applianced.iscsi.kernel import plan
from applianced.iscsi.kernel.model import Session
from applianced.state import Config, Portal, StateStore, Target
from tests.support.fake_firewall import FakeFirewall
from tests.support.fake_kernel import FakeKernel
from tests.unit.test_engine import HOSTS, INITIATOR, make_engine, populate, run, started

# -- entries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("10.0.0.0/24", "10.0.0.0/24"),
        (" 10.0.0.7 ", "10.0.0.7"),
        ("10.0.0.7/32", "10.0.0.7"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("FD00:0::/64", "fd00::/64"),
        ("fd00::1/128", "fd00::1"),
        ("52-54-00-AB-CD-EF", "52:54:00:ab:cd:ef"),
        ("Client1.Example.", "client1.example"),
        ("storage-host", "storage-host"),
    ],
)
def test_entries_are_normalised(text, entry):
    assert firewall.normalize_source(text) == entry


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.5/24", "host bits set; the network is 10.0.0.0/24"),
        ("fd00::1/64", "host bits set"),
        ("10.0.0.0/33", "not an IP address or network"),
        ("10.0.0", "not an IP address or network"),
        ("10.0.0.256", "not an IP address or network"),
        ("fe80::1%eth0", "not an IP address or network"),
        ("::ffff:10.0.0.1", "IPv4-mapped"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "empty MAC"),
        ("52:54:00:ab:cd", "not an IP address or network"),
        ("bad_name.example", "not an IP address or network"),
        ("-lead.example", "not an IP address or network"),
        ("", "not an IP address or network"),
        ("a" * 64 + ".example", "not an IP address or network"),
    ],
)
def test_bad_entries_are_refused(text, message):
    with pytest.raises(InvalidArgument, match=message):
        firewall.normalize_source(text)


def test_lists_are_sorted_and_deduplicated():
    entries = ["b.example", "52:54:00:00:00:02", "fd00::/64", "10.0.0.9", "10.0.0.0/24", "10.0.0.9/32", "a.example"]
    assert firewall.normalize_sources(entries) == (
        "10.0.0.0/24",
        "10.0.0.9",
        "fd00::/64",
        "52:54:00:00:00:02",
        "a.example",
        "b.example",
    )
    with pytest.raises(InvalidArgument, match="at most 1024"):
        firewall.normalize_sources(str(ipaddress.ip_address(0x0A000000 + n)) for n in range(1025))


# -- the rule set ------------------------------------------------------------------------------


def config_with(*targets: Target, portals: tuple[Portal, ...]) -> Config:
    return Config("node", targets={t.name: t for t in targets}, portals=portals)


def to_portal(daddr):
    return [*daddr, match({"payload": {"protocol": "tcp", "field": "dport"}}, 3260)]


def match(left, right):
    return {"match": {"op": "==", "left": left, "right": right}}


def rule(expr, comment=None):
    body = {"family": "inet", "table": "applianced", "chain": "portals", "expr": expr}
    return {"rule": {**body, "comment": comment} if comment else body}


def test_rule_set_for_each_kind_of_portal_and_source():
    sources = ("10.0.0.0/24", "10.0.0.9", "10.0.1.0/24", "fd00::/64", "52:54:00:00:00:01", "c1.example")
    config = config_with(
        Target("t1", "iqn.2003-01.org.example:t1", allowed_sources=sources),
        Target("t2", "iqn.2003-01.org.example:t2"),
        portals=(
            Portal("::", 3260, ("t1",)),
            Portal("10.0.0.1", 3260, ("t1",)),
            Portal("0.0.0.0", 3260, ("t1",)),
            Portal("fd00::1", 3260, ("t1",)),
            Portal("10.0.0.1", 3261, ("t2",)),
        ),
    )
    resolved = {"c1.example": frozenset({"10.0.0.77", "10.9.0.1", "fd01::1"})}
    rules = firewall.ruleset(firewall.filters(config, resolved).values())
    table, chain, *rest = rules
    assert table == {"table": {"family": "inet", "name": "applianced"}}
    assert chain["chain"] == {
        "family": "inet",
        "table": "applianced",
        "name": "portals",
        "type": "filter",
        "hook": "input",
        "prio": 0,
        "policy": "accept",
    }
    ip4 = match(
        {"payload": {"protocol": "ip", "field": "saddr"}},
        # Collapsed: 10.0.0.0/24 holds .9 and .77, and is merged with 10.0.1.0/24.
        {"set": [{"prefix": {"addr": "10.0.0.0", "len": 23}}, "10.9.0.1"]},
    )
    ip6 = match(
        {"payload": {"protocol": "ip6", "field": "saddr"}},
        {"set": [{"prefix": {"addr": "fd00::", "len": 64}}, "fd01::1"]},
    )
    mac = match({"payload": {"protocol": "ether", "field": "saddr"}}, "52:54:00:00:00:01")
    reset = {"reject": {"type": "tcp reset"}}
    accept = {"accept": None}
    v4 = to_portal([match({"payload": {"protocol": "ip", "field": "daddr"}}, "10.0.0.1")])
    v6 = to_portal([match({"payload": {"protocol": "ip6", "field": "daddr"}}, "fd00::1")])
    any4 = to_portal([match({"payload": {"protocol": "ip", "field": "version"}}, 4)])
    any46 = to_portal([])
    # Specific addresses first, then 0.0.0.0, then the dual-stack ::; t2's portal stays open.
    assert rest == [
        rule([*v4, ip4, accept]),
        rule([*v4, mac, accept]),
        rule([*v4, reset], "applianced portal 10.0.0.1:3260"),
        rule([*v6, ip6, accept]),
        rule([*v6, mac, accept]),
        rule([*v6, reset], "applianced portal [fd00::1]:3260"),
        rule([*any4, ip4, accept]),
        rule([*any4, mac, accept]),
        rule([*any4, reset], "applianced portal 0.0.0.0:3260"),
        rule([*any46, ip4, accept]),
        rule([*any46, ip6, accept]),
        rule([*any46, mac, accept]),
        rule([*any46, reset], "applianced portal [::]:3260"),
    ]


def held_rule(chain, expr, comment=None):
    return {"rule": {**rule(expr, comment)["rule"], "table": "applianced-held", "chain": chain}}


def test_a_held_portal_is_silenced_both_ways_and_refuses_new_connections():
    table, incoming, outgoing, *rules = firewall.held_ruleset([("fd00::10", 3260), ("10.0.0.10", 3260)] * 2)
    assert table == {"table": {"family": "inet", "name": "applianced-held"}}
    # A table of its own, its chains before the allow-lists'.
    chain = {"family": "inet", "table": "applianced-held", "type": "filter", "prio": -10, "policy": "accept"}
    assert incoming == {"chain": {**chain, "name": "held", "hook": "input"}}
    assert outgoing == {"chain": {**chain, "name": "held-out", "hook": "output"}}
    v4 = to_portal([match({"payload": {"protocol": "ip", "field": "daddr"}}, "10.0.0.10")])
    first_syn = match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn")
    comment = "applianced portal held for a switchover 10.0.0.10:3260"
    from_portal = [
        match({"payload": {"protocol": "ip", "field": "saddr"}}, "10.0.0.10"),
        match({"payload": {"protocol": "tcp", "field": "sport"}}, 3260),
        {"drop": None},
    ]
    # Each portal once, whatever the repetitions; in: its first SYN refused, the rest dropped.
    assert len(rules) == 6
    assert rules[:2] == [
        held_rule("held", [*v4, first_syn, {"reject": {"type": "icmpx", "expr": "port-unreachable"}}]),
        held_rule("held", [*v4, {"drop": None}], comment),
    ]
    assert rules[3]["rule"]["comment"] == "applianced portal held for a switchover [fd00::10]:3260"
    # Out: everything it sends, a reset of a closing session included.
    assert rules[4] == held_rule("held-out", from_portal, comment)
    assert firewall.held_ruleset([]) == ()
    with pytest.raises(InvalidArgument, match="only a portal's own address"):
        firewall.held_ruleset([("10.0.0.10", 3260), ("::", 3260)])


def test_held_portals_reach_the_hold_table_until_released(tmp_path):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await restricted(engine, "10.1.0.0/24")
        assert (fw.held, fw.holds) == ((), 1), "a start releases what a daemon before it held"
        main_table, replacements = fw.ruleset, fw.replacements
        await engine.hold_portals([("10.0.0.10", 3260), ("fd00::10", 3260)])
        assert fw.held == firewall.held_ruleset([("10.0.0.10", 3260), ("fd00::10", 3260)])
        # Neither the hold nor a commit while held touches the allow-lists' table.
        await engine.set_targets_enabled(["t1"], False)
        assert (fw.ruleset, fw.replacements) == (main_table, replacements)
        await engine.hold_portals([("fd00::10", 3260), ("10.0.0.10", 3260)])
        assert fw.holds == 2, "holding the same portals again writes nothing"
        # A failed release keeps them known as held: the next release writes again.
        fw.fail = True
        with pytest.raises(KernelError):
            await engine.hold_portals(())
        fw.fail = False
        await engine.hold_portals(())
        assert (fw.held, fw.holds) == ((), 3)
        # A bad address holds nothing and releases nothing.
        await engine.hold_portals([("10.0.0.10", 3260)])
        with pytest.raises(InvalidArgument):
            await engine.hold_portals([("0.0.0.0", 3260)])
        assert fw.held == firewall.held_ruleset([("10.0.0.10", 3260)])

    run(scenario())


def test_a_name_that_does_not_resolve_admits_no_one():
    config = config_with(
        Target("t1", "iqn.2003-01.org.example:t1", allowed_sources=("gone.example",)),
        portals=(Portal("10.0.0.1", 3260),),
    )
    rules = firewall.ruleset(firewall.filters(config, {"gone.example": frozenset()}).values())
    assert [r["rule"]["expr"][-1] for r in rules[2:]] == [{"reject": {"type": "tcp reset"}}]


def test_without_allow_lists_there_is_no_table_and_the_batch_removes_it():
    config = config_with(Target("t1", "iqn.2003-01.org.example:t1"), portals=(Portal("10.0.0.1", 3260),))
    assert firewall.ruleset(firewall.filters(config, {}).values()) == ()
    table = {"table": {"family": "inet", "name": "applianced"}}
    assert firewall.transaction(()) == {"nftables": [{"add": table}, {"delete": table}]}
    wanted = ({"table": {"family": "inet", "name": "applianced"}}, {"chain": {"name": "x"}})
    assert firewall.transaction(wanted)["nftables"][2:] == [{"add": obj} for obj in wanted]
    # What the daemon hands to `nft -j -f -` is plain JSON.
    json.dumps(firewall.transaction(wanted))


def test_one_portal_admits_one_list():
    t1 = Target("t1", "iqn.2003-01.org.example:t1", allowed_sources=("10.0.0.0/24",))
    t2 = Target("t2", "iqn.2003-01.org.example:t2")
    firewall.check_portals(config_with(t1, t2, portals=(Portal("10.0.0.1", 3260, ("t1",)),)))
    message = r"portal \[::\]:3260 serves every target.*t2 admits any source; t1 admits 10\.0\.0\.0/24"
    with pytest.raises(InvalidArgument, match=message):
        firewall.check_portals(config_with(t1, t2, portals=(Portal("::", 3260),)))
    with pytest.raises(InvalidArgument, match=r"portal 10\.0\.0\.1:3260 serves targets t1, t2"):
        firewall.check_portals(config_with(t1, t2, portals=(Portal("10.0.0.1", 3260, ("t1", "t2")),)))
    same = dataclasses.replace(t2, allowed_sources=t1.allowed_sources)
    firewall.check_portals(config_with(t1, same, portals=(Portal("::", 3260),)))


def test_admits_judges_addresses_by_networks_and_names():
    sources = ("10.0.0.0/24", "52:54:00:00:00:01", "c1.example")
    resolved = {"c1.example": frozenset({"fd00::7"})}
    assert firewall.admits(sources, resolved, "10.0.0.200")
    assert firewall.admits(sources, resolved, "fd00::7")
    assert not firewall.admits(sources, resolved, "10.0.1.1")
    assert firewall.admits((), {}, "192.0.2.1")


# -- the engine --------------------------------------------------------------------------------


def everything(engine, fw):
    """What a failed operation must leave as it was: configuration, kernel, rules, state file."""
    return engine.config, engine.kernel.snapshot(), fw.ruleset, engine.store.path.read_bytes()


async def restricted(engine, *sources):
    """The first slice, with t1 on a portal of its own and a list set."""
    await populate(engine)
    await engine.delete_portal("10.1.0.5:3260")
    await engine.create_portal("10.1.0.5", 3260, ["t1"])
    if sources:
        await engine.set_allowed_sources("t1", sources)


def test_lists_reach_the_firewall_and_the_state_file(tmp_path):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await restricted(engine)
        assert fw.ruleset == ()
        target = await engine.set_allowed_sources("t1", ["Client1.Example", "10.1.0.0/24"])
        assert target.allowed_sources == ("10.1.0.0/24", "client1.example")
        assert engine.store.load().targets["t1"].allowed_sources == target.allowed_sources
        assert [r["rule"]["expr"][-1] for r in fw.ruleset[2:]] == [{"accept": None}, {"reject": {"type": "tcp reset"}}]
        replaced = fw.replacements
        await engine.set_allowed_sources("t1", ["10.1.0.0/24", "client1.example."])
        assert fw.replacements == replaced, "the same list changes nothing"
        # A restart over an intact kernel and firewall changes nothing.
        assert await make_engine(tmp_path, engine.kernel, fw).start() == 0
        await engine.set_allowed_sources("t1", [])
        assert fw.ruleset == ()

    run(scenario())


def test_a_commit_that_keeps_every_rule_leaves_the_table_alone(tmp_path):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await restricted(engine, "10.1.0.0/24")
        looks = fw.looks
        await engine.add_acl("t1", "iqn.1994-05.com.redhat:client2")
        await engine.set_targets_enabled(["t1"], False)  # a failover's role change
        assert fw.looks == looks
        await engine.set_allowed_sources("t1", ["10.1.0.0/24", "10.2.0.0/24"])
        assert fw.looks == looks + 2, "the old and new rules together, then the new ones"
        # A reconcile reads the table back and puts back what another tool removed.
        fw.ruleset = ()
        await engine.refresh_replication()
        assert [r["rule"]["expr"][-1] for r in fw.ruleset[2:]][-1] == {"reject": {"type": "tcp reset"}}

    run(scenario())


def test_names_are_resolved_again_when_rules_are_applied(tmp_path, monkeypatch, caplog):
    fw = FakeFirewall()
    kernel = FakeKernel()

    def addresses():
        return {str(e["match"]["right"]) for r in fw.ruleset[2:] for e in r["rule"]["expr"] if "match" in e}

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel, fw))
        await restricted(engine, "client1.example")
        assert "10.1.0.21" in addresses()
        monkeypatch.setitem(HOSTS, "client1.example", {"10.1.0.22"})
        assert await engine.reload() == 1
        assert "10.1.0.22" in addresses() and "10.1.0.21" not in addresses()
        # At start-up a name that no longer resolves is a warning, and admits no one.
        monkeypatch.delitem(HOSTS, "client1.example")
        with caplog.at_level(logging.WARNING):
            assert await make_engine(tmp_path, kernel, fw).start() == 1
        assert "client1.example does not resolve" in caplog.text
        assert [r["rule"]["expr"][-1] for r in fw.ruleset[2:]] == [{"reject": {"type": "tcp reset"}}]

    run(scenario())


@pytest.mark.parametrize(
    ("sources", "error", "message"),
    [
        (["10.1.0.5/24"], InvalidArgument, "host bits set"),
        (["10.1.0.0/24", "300.1.1.1"], InvalidArgument, "not an IP address or network"),
        (["52:54:00:zz:00:01"], InvalidArgument, "not an IP address or network"),
        (["01:00:5e:00:00:01"], InvalidArgument, "multicast"),
        (["nowhere.example"], InvalidArgument, "DNS name nowhere.example does not resolve"),
        (["bad_name"], InvalidArgument, "not an IP address or network"),
    ],
)
def test_bad_lists_get_a_named_error_and_change_nothing(tmp_path, sources, error, message):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await restricted(engine, "10.1.0.21")
        before = everything(engine, fw)
        with pytest.raises(error, match=message):
            await engine.set_allowed_sources("t1", sources)
        assert everything(engine, fw) == before

    run(scenario())


def test_a_shared_portal_refuses_different_lists(tmp_path):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await populate(engine)
        await engine.create_target("t2")
        # The server-wide portal serves t1 and t2: t1 alone cannot have a list there.
        with pytest.raises(InvalidArgument, match=r"portal 10\.1\.0\.5:3260 serves every target.*t2 admits any source"):
            await engine.set_allowed_sources("t1", ["10.1.0.0/24"])
        with pytest.raises(NotFound):
            await engine.set_allowed_sources("nope", ["10.1.0.0/24"])
        await engine.delete_portal("10.1.0.5:3260")
        await engine.create_portal("10.1.0.5", 3260, ["t1"])
        await engine.set_allowed_sources("t1", ["10.1.0.0/24"])
        state_bytes = engine.store.path.read_bytes()
        # Nor can a new server-wide portal, a shared one, or a new target behind a shared one.
        with pytest.raises(InvalidArgument, match=r"portal \[fd00::5\]:3260 serves every target"):
            await engine.create_portal("fd00::5", 3260)
        with pytest.raises(InvalidArgument, match="serves targets t1, t2"):
            await engine.create_portal("fd00::5", 3260, ["t1", "t2"])
        await engine.create_portal("fd00::5", 3261, ["t1"])
        assert len(firewall.filters(engine.config, {})) == 2
        await engine.delete_portal("[fd00::5]:3261")
        assert engine.store.path.read_bytes() == state_bytes

    run(scenario())


def test_a_new_target_cannot_join_a_restricted_server_wide_portal(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await engine.set_allowed_sources("t1", ["10.1.0.0/24"])
        with pytest.raises(InvalidArgument, match=r"serves every target.*t2 admits any source"):
            await engine.create_target("t2")
        assert set(engine.config.targets) == {"t1"}

    run(scenario())


def test_cutting_off_a_logged_in_initiator_needs_force(tmp_path):
    kernel = FakeKernel()

    async def scenario():
        engine = await started(make_engine(tmp_path, kernel))
        await restricted(engine)
        iqn = engine.config.targets["t1"].iqn
        kernel.session_list = [Session(iqn, INITIATOR, "LOGGED_IN", ("10.1.0.21",))]
        await engine.set_allowed_sources("t1", ["10.1.0.0/24"])
        await engine.set_allowed_sources("t1", ["client1.example"])
        for sources in (["10.1.0.99"], ["52:54:00:00:00:01"]):
            with pytest.raises(Busy, match=rf"{INITIATOR} \(10.1.0.21\).*use force"):
                await engine.set_allowed_sources("t1", sources)
        assert engine.config.targets["t1"].allowed_sources == ("client1.example",)
        await engine.set_allowed_sources("t1", ["10.1.0.99"], force=True)
        assert engine.config.targets["t1"].allowed_sources == ("10.1.0.99",)

    run(scenario())


def test_a_firewall_failure_rolls_back_kernel_state_and_rules(tmp_path):
    fw = FakeFirewall()

    async def scenario():
        engine = await started(make_engine(tmp_path, firewall=fw))
        await restricted(engine, "10.1.0.21")
        before = everything(engine, fw)
        fw.fail = True
        with pytest.raises(KernelError, match="injected firewall failure"):
            await engine.set_allowed_sources("t1", ["10.1.0.22"])
        with pytest.raises(KernelError):
            await engine.create_portal("fd00::5", 3260, ["t1"])
        assert everything(engine, fw) == before

    run(scenario())


def test_portals_are_never_open_while_lio_listens(tmp_path):
    """A new portal is filtered before LIO adds it; a dropped one keeps its filter until LIO drops it."""
    fw = FakeFirewall()
    seen = {}

    class Recording(FakeKernel):
        def apply(self, actions):
            for action in actions:
                if isinstance(action, plan.AddPortal | plan.RemovePortal):
                    seen[type(action).__name__, action.address] = {
                        r["rule"]["expr"][0]["match"]["right"] for r in fw.ruleset[2:]
                    }
            super().apply(actions)

    async def scenario():
        engine = await started(make_engine(tmp_path, Recording(), fw))
        await restricted(engine, "10.1.0.21")
        await engine.create_portal("fd00::5", 3260, ["t1"])
        await engine.delete_portal("[fd00::5]:3260")
        assert "fd00::5" in seen["AddPortal", "fd00::5"]
        assert "fd00::5" in seen["RemovePortal", "fd00::5"]
        assert "fd00::5" not in {r["rule"]["expr"][0]["match"]["right"] for r in fw.ruleset[2:]}

    run(scenario())


def test_old_state_files_load_and_exports_carry_the_lists(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await restricted(engine, "10.1.0.21", "client1.example")
        data = engine.store.path.read_text()
        # A state file written before allow-lists existed has no such key.
        old = json.loads(data)
        del old["targets"][0]["allowed_sources"]
        assert Config.from_json(old).targets["t1"].allowed_sources == ()
        exported = engine.export_configuration()
        await engine.set_allowed_sources("t1", [])
        await engine.import_configuration(json.dumps(exported), force=True)
        assert engine.config.targets["t1"].allowed_sources == ("10.1.0.21", "client1.example")
        # An import is held to the same rules: names must resolve, lists must be canonical.
        for sources, message in ((["gone.example"], "does not resolve"), (["10.1.0.0/16", "10.0.0.0/8"], "unsorted")):
            bad = json.loads(json.dumps(exported))
            bad["targets"][0]["allowed_sources"] = sources
            with pytest.raises(InvalidArgument, match=message):
                await engine.import_configuration(json.dumps(bad), force=True)
        assert StateStore(tmp_path / "state", "state.json").load() == engine.config

    run(scenario())


def test_a_node_without_nftables_needs_it_only_for_rules():
    # (A library that cannot load: the host's own tables are never touched by unit tests.)
    nft = firewall.NftFirewall(library="libnftables-absent.so.1")
    assert nft.observe() == ()
    assert nft.apply(()) is False, "no allow-list, nothing to do"
    nft.hold(())  # nothing was ever held
    held = firewall.held_ruleset([("10.0.0.10", 3260)])
    with pytest.raises(KernelError, match="libnftables is missing"):
        nft.hold(held)
    with pytest.raises(KernelError, match="libnftables is missing"):
        nft.apply(firewall.ruleset([firewall.PortalFilter("10.0.0.1", 3260, (), ("52:54:00:00:00:01",))]))
