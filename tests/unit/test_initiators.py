"""Recently seen initiators: counter increases into sightings, the sampler and its file."""

import asyncio
import json
import stat
from collections import Counter

from applianced.iscsi.initiators import (
    CHAP,
    LOGGED_IN,
    LOGIN_FAILED,
    NEGOTIATION,
    NOT_IN_ACL,
    REFUSED,
    SESSION_REFRESH,
    WINDOW,
    SeenInitiators,
    Sighting,
    increase,
    logins,
    refusals,
)
from applianced.iscsi.kernel.model import LoginCounters, Session
from applianced.state import Config, Target
from tests.support.fake_kernel import FakeKernel
from tests.unit.test_engine import make_engine

T1 = "iqn.2003-01.org.linux-iscsi.applianced:t1"
T2 = "iqn.2003-01.org.linux-iscsi.applianced:t2"
ALICE = "iqn.1994-05.com.redhat:alice"
BOB = "iqn.1994-05.com.redhat:bob"


def not_authorized(name):
    return f"iSCSI Initiator Node: {name} is not authorized to access iSCSI target portal group: 1."


def counters(accepts=0, authorize=0, authenticate=0, negotiate=0, other=0, name="", address=""):
    return LoginCounters(accepts, authorize, authenticate, negotiate, other, name, address)


# -- reading LIO's counters ------------------------------------------------------------------


def test_an_acl_refusal_is_named_from_the_kernel_log_and_placed_by_the_statistics():
    # LIO counts the refusal twice (authorize, then negotiate when it drops the connection)
    # and does not know the name; the kernel log does.
    rise = {T1: counters(authorize=1, negotiate=1, address="10.0.0.7")}
    log = [not_authorized(ALICE), LOGIN_FAILED]
    assert refusals(rise, log) == [Sighting(T1, ALICE, "10.0.0.7", REFUSED, NOT_IN_ACL)]


def test_without_the_kernel_log_an_acl_refusal_keeps_its_address_but_no_name():
    rise = {T1: counters(authorize=1, negotiate=1, address="10.0.0.7")}
    assert refusals(rise, None) == [Sighting(T1, "", "10.0.0.7", REFUSED, NOT_IN_ACL)]


def test_a_chap_failure_is_named_by_the_statistics():
    rise = {T1: counters(authenticate=1, negotiate=1, name=BOB, address="10.0.0.8")}
    assert refusals(rise, [LOGIN_FAILED]) == [Sighting(T1, BOB, "10.0.0.8", REFUSED, CHAP)]


def test_only_the_last_failure_of_a_sample_is_named_and_the_rest_counted_without_a_name():
    rise = {T1: counters(authenticate=3, negotiate=3, name=BOB, address="10.0.0.8")}
    assert refusals(rise, [LOGIN_FAILED] * 3) == [
        Sighting(T1, BOB, "10.0.0.8", REFUSED, CHAP),
        Sighting(T1, "", "", REFUSED, CHAP, 2),
    ]


def test_a_refused_negotiation_counts_once_although_lio_counts_it_twice():
    # A digest mismatch: LIO answers "initiator error" (+1) and drops the connection (+1).
    rise = {T1: counters(negotiate=2, name=BOB, address="10.0.0.8")}
    assert refusals(rise, [LOGIN_FAILED]) == [Sighting(T1, BOB, "10.0.0.8", REFUSED, NEGOTIATION)]
    # Without the log the count is the fewest logins that explain the counters.
    assert refusals(rise, None) == [Sighting(T1, BOB, "10.0.0.8", REFUSED, NEGOTIATION)]


def test_initiators_that_gave_up_count_once_each_when_the_log_says_so():
    rise = {T1: counters(negotiate=2, name=BOB, address="10.0.0.8")}
    assert refusals(rise, [LOGIN_FAILED, LOGIN_FAILED]) == [
        Sighting(T1, BOB, "10.0.0.8", REFUSED, NEGOTIATION),
        Sighting(T1, "", "", REFUSED, NEGOTIATION),
    ]


def test_the_last_failure_is_not_given_to_any_reason_when_several_occurred():
    rise = {T1: counters(authorize=1, authenticate=1, negotiate=2, name=BOB, address="10.0.0.8")}
    log = [not_authorized(ALICE), LOGIN_FAILED, LOGIN_FAILED]
    assert refusals(rise, log) == [
        Sighting(T1, ALICE, "", REFUSED, NOT_IN_ACL),
        Sighting(T1, "", "", REFUSED, CHAP),
    ]


def test_acl_refusals_on_two_targets_are_named_only_when_the_names_cannot_be_mixed_up():
    rise = {T1: counters(authorize=1, negotiate=1), T2: counters(authorize=1, negotiate=1)}
    mixed = [not_authorized(ALICE), LOGIN_FAILED, not_authorized(BOB), LOGIN_FAILED]
    assert refusals(rise, mixed) == [
        Sighting(T1, "", "", REFUSED, NOT_IN_ACL),
        Sighting(T2, "", "", REFUSED, NOT_IN_ACL),
    ]
    same = [not_authorized(ALICE), LOGIN_FAILED, not_authorized(ALICE), LOGIN_FAILED]
    assert refusals(rise, same) == [
        Sighting(T1, ALICE, "", REFUSED, NOT_IN_ACL),
        Sighting(T2, ALICE, "", REFUSED, NOT_IN_ACL),
    ]


def test_several_acl_refusals_on_one_target_take_the_logged_names_in_order():
    rise = {T1: counters(authorize=3, negotiate=3, address="10.0.0.9")}
    log = [not_authorized(ALICE), not_authorized(BOB), not_authorized(ALICE)]
    assert refusals(rise, log) == [
        Sighting(T1, ALICE, "10.0.0.9", REFUSED, NOT_IN_ACL, 2),
        Sighting(T1, BOB, "", REFUSED, NOT_IN_ACL),
    ]
    # A log line missing (or one too many, from a target applianced does not manage): no names.
    assert refusals(rise, log[:2]) == [Sighting(T1, "", "10.0.0.9", REFUSED, NOT_IN_ACL, 3)]


def test_increase_starts_again_from_zero_when_the_target_was_made_anew():
    assert increase(counters(accepts=2, negotiate=5), counters(accepts=3, negotiate=5)) == counters(accepts=1)
    assert increase(counters(accepts=2, negotiate=5), counters(accepts=1)) == counters(accepts=1)
    assert increase(None, counters(accepts=4)) == counters(accepts=4)


def test_each_new_session_takes_one_counted_login_and_the_rest_stay_unnamed():
    before = {T1: Counter({(ALICE, "10.0.0.7"): 1})}
    now = {T1: Counter({(ALICE, "10.0.0.7"): 1, (BOB, "10.0.0.8"): 1})}
    assert logins({T1: 2}, before, now) == [
        Sighting(T1, ALICE, "10.0.0.7", LOGGED_IN, "", 0),
        Sighting(T1, BOB, "10.0.0.8", LOGGED_IN, "", 1),
        Sighting(T1, "", "", LOGGED_IN, "", 1),
    ]
    # Two sessions of one initiator (multipath) are one entry with both addresses.
    mpio = {T1: Counter({(ALICE, "10.0.0.7"): 1, (ALICE, "10.1.0.7"): 1})}
    assert logins({T1: 2}, {}, mpio) == [Sighting(T1, ALICE, "10.0.0.7,10.1.0.7", LOGGED_IN, "", 2)]


# -- the sampler -----------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def make_kernel(*iqns):
    kernel = FakeKernel()
    for iqn in iqns:
        kernel.targets[iqn] = None  # only the IQN matters to login_activity()
    return kernel


def make_seen(kernel, tmp_path, clock, names=("t1",)):
    """A sampler of node-a's targets ``names`` (a list the test may extend)."""

    def config():
        targets = {n: Target(n, f"iqn.2003-01.org.linux-iscsi.applianced:{n}") for n in names}
        return Config(node_id="node-a", targets=targets)

    # A monotonic clock that jumps by an hour per reading makes every sample read sessions.
    ticks = iter(range(0, 10**8, 3600))
    return SeenInitiators(kernel, tmp_path / "initiators.json", config, clock, lambda: float(next(ticks)))


def seen_one_chap_failure(kernel, tmp_path, clock):
    seen = make_seen(kernel, tmp_path, clock)
    seen.sample()
    kernel.login_counters[T1] = counters(authenticate=1, negotiate=1, name=BOB, address="10.0.0.8")
    seen.sample()
    return seen


def table(seen):
    return sorted((r.target, r.initiator, r.address, r.outcome, r.reason, r.count) for r in seen.recent())


def test_what_lio_counted_before_the_first_sample_is_history(tmp_path):
    kernel = make_kernel(T1)
    kernel.login_counters[T1] = counters(accepts=5, authenticate=2, negotiate=2, name=BOB, address="10.0.0.8")
    kernel.session_list = [Session(T1, ALICE, "LOGGED_IN", ("10.0.0.7",))]
    seen = make_seen(kernel, tmp_path, Clock())
    seen.sample()
    assert table(seen) == [(T1, ALICE, "10.0.0.7", LOGGED_IN, "", 0)]


def test_logins_and_refusals_are_recorded_with_their_times(tmp_path):
    clock = Clock()
    kernel = make_kernel(T1)
    seen = make_seen(kernel, tmp_path, clock)
    seen.sample()
    first = clock.now
    clock.now += 5
    kernel.login_counters[T1] = counters(accepts=1, authorize=1, negotiate=1, address="10.0.0.9")
    kernel.kernel_log += [not_authorized(BOB), LOGIN_FAILED, "an unrelated line"]
    kernel.session_list = [Session(T1, ALICE, "LOGGED_IN", ("10.0.0.7",))]
    seen.sample()
    assert table(seen) == [
        (T1, ALICE, "10.0.0.7", LOGGED_IN, "", 1),
        (T1, BOB, "10.0.0.9", REFUSED, NOT_IN_ACL, 1),
    ]
    assert {(r.first_seen, r.last_seen, r.node) for r in seen.recent()} == {(first + 5, first + 5, "node-a")}
    clock.now += 5
    kernel.session_list = []
    kernel.login_counters[T1] = counters(accepts=1, authorize=2, negotiate=2, address="10.0.0.9")
    kernel.kernel_log += [not_authorized(BOB), LOGIN_FAILED]
    seen.sample()
    refused = next(r for r in seen.recent() if r.outcome == REFUSED)
    assert (refused.count, refused.first_seen, refused.last_seen) == (2, first + 5, first + 10)
    assert seen.recent()[0] == refused, "newest first"


def test_a_restart_counts_nothing_twice_and_misses_nothing(tmp_path):
    clock = Clock()
    kernel = make_kernel(T1)
    before = table(seen_one_chap_failure(kernel, tmp_path, clock))
    again = make_seen(kernel, tmp_path, clock)
    again.sample()
    assert table(again) == before == [(T1, BOB, "10.0.0.8", REFUSED, CHAP, 1)]
    # What happens while the daemon is down is counted, and named from the log, at the next start.
    kernel.login_counters[T1] = counters(authorize=1, authenticate=1, negotiate=2, address="10.0.0.9")
    kernel.kernel_log += [not_authorized(ALICE), LOGIN_FAILED]
    third = make_seen(kernel, tmp_path, clock)
    third.sample()
    assert table(third) == [
        (T1, ALICE, "10.0.0.9", REFUSED, NOT_IN_ACL, 1),
        (T1, BOB, "10.0.0.8", REFUSED, CHAP, 1),
    ]


def test_after_a_reboot_everything_lio_counted_is_news(tmp_path):
    clock = Clock()
    kernel = make_kernel(T1)
    kernel.login_counters[T1] = counters(accepts=9)
    make_seen(kernel, tmp_path, clock).sample()
    kernel.boot_id = "boot-2"
    kernel.kernel_log = [not_authorized(ALICE), LOGIN_FAILED]
    kernel.login_counters[T1] = counters(authorize=1, negotiate=1, address="10.0.0.9")
    seen = make_seen(kernel, tmp_path, clock)
    seen.sample()
    assert table(seen) == [(T1, ALICE, "10.0.0.9", REFUSED, NOT_IN_ACL, 1)]


def test_a_target_made_after_the_first_sample_is_counted_from_zero(tmp_path):
    kernel = make_kernel(T1)
    names = ["t1"]
    seen = make_seen(kernel, tmp_path, Clock(), names)
    seen.sample()
    kernel.targets[T2] = None
    kernel.login_counters[T2] = counters(authenticate=1, negotiate=1, name=BOB, address="10.0.0.8")
    names.append("t2")
    seen.sample()
    assert table(seen) == [(T2, BOB, "10.0.0.8", REFUSED, CHAP, 1)]


def test_sightings_older_than_seven_days_are_dropped(tmp_path):
    clock = Clock()
    seen = seen_one_chap_failure(make_kernel(T1), tmp_path, clock)
    clock.now += WINDOW - 1
    assert len(seen.recent()) == 1
    clock.now += 2
    assert seen.recent() == []
    seen.sample()
    assert json.loads((tmp_path / "initiators.json").read_text())["records"] == []


def test_the_file_is_private_and_a_broken_one_is_replaced(tmp_path, caplog):
    kernel = make_kernel(T1)
    path = tmp_path / "initiators.json"
    path.write_text("{not json")
    seen = make_seen(kernel, tmp_path, Clock())
    seen.sample()
    assert "cannot be read" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["boot_id"] == "boot-1"


def test_the_engine_samples_its_own_targets_for_its_node(tmp_path):
    async def scenario():
        engine = make_engine(tmp_path)
        await engine.start()
        await engine.create_target("t1")
        engine.seen.sample()
        engine.kernel.login_counters[T1] = counters(authenticate=1, negotiate=1, name=BOB, address="10.0.0.8")
        engine.seen.sample()
        return engine

    engine = asyncio.run(scenario())
    (record,) = engine.seen.recent()
    assert (record.node, record.target, record.initiator) == (engine.config.node_id, T1, BOB)
    assert (tmp_path / "state" / "initiators.json").exists()


def test_sessions_are_read_for_targets_with_new_logins_and_otherwise_every_few_minutes(tmp_path):
    kernel = make_kernel(T1, T2)
    now = [0.0]
    config = Config(node_id="node-a", targets={"t1": Target("t1", T1), "t2": Target("t2", T2)})
    seen = SeenInitiators(kernel, tmp_path / "initiators.json", lambda: config, Clock(), lambda: now[0])
    seen.sample()
    now[0] += 5
    seen.sample()
    assert kernel.session_reads == [T1, T2], "the first sample reads them all, a quiet one none"
    kernel.login_counters[T2] = counters(accepts=1)
    now[0] += 5
    seen.sample()
    assert kernel.session_reads[2:] == [T2], "a new login is looked up at once, on its target only"
    now[0] += SESSION_REFRESH
    seen.sample()
    assert kernel.session_reads[3:] == [T1, T2]
