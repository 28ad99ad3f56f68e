"""The failover decision table: every row, and the safety rules across all inputs."""

import itertools

import pytest

from applianced.failover.decision import Action, Observation, Role, decide

ROWS = [
    # role, peer heard, ping reached, copies current, peer role, peer reaches ping, answered, forced -> action
    (Role.ACTIVE, True, True, True, Role.PASSIVE, True, False, False, Action.STAY),
    (Role.ACTIVE, False, True, True, None, None, False, False, Action.STAY),  # peer died
    (Role.ACTIVE, False, False, True, None, None, False, False, Action.STOP_SERVING),  # isolated
    (Role.ACTIVE, True, False, True, Role.PASSIVE, True, False, False, Action.HAND_OVER),  # data link down here
    (Role.ACTIVE, True, False, True, Role.PASSIVE, False, False, False, Action.STAY),  # ping nodes down
    (Role.ACTIVE, True, False, True, Role.PASSIVE, None, False, False, Action.STAY),  # peer said nothing yet
    (Role.PASSIVE, True, True, True, Role.ACTIVE, True, False, False, Action.STAY),
    (Role.PASSIVE, True, False, True, Role.ACTIVE, True, False, False, Action.STAY),  # own data link down
    (Role.PASSIVE, True, True, True, Role.PASSIVE, True, False, False, Action.STAY),  # nobody serves: admin's
    (Role.PASSIVE, False, True, True, Role.ACTIVE, True, False, False, Action.TAKE_OVER),  # peer died
    (Role.PASSIVE, False, False, True, Role.ACTIVE, True, False, False, Action.STAY),  # isolated
    (Role.PASSIVE, False, True, True, Role.ACTIVE, True, True, False, Action.REFUSE_TAKEOVER),  # VIP answers
    (Role.PASSIVE, False, True, True, Role.ACTIVE, True, True, True, Action.REFUSE_TAKEOVER),  # even forced
    (Role.PASSIVE, False, True, False, Role.ACTIVE, True, False, False, Action.REFUSE_TAKEOVER),  # stale copy
    (Role.PASSIVE, False, True, False, Role.ACTIVE, True, False, True, Action.TAKE_OVER),  # forced
    (Role.STOPPED, False, True, True, Role.ACTIVE, True, False, False, Action.STAY),
]
# Both nodes believe they serve, or neither does, and they hear each other.
MEETINGS = [
    # role, peer role, peer active later, active last, copies current, ping reached -> action
    (Role.ACTIVE, Role.ACTIVE, True, False, True, True, Action.STOP_SERVING),  # the peer took over from us
    (Role.ACTIVE, Role.ACTIVE, False, True, True, True, Action.STAY),  # we took over from it: it stops
    (Role.PASSIVE, Role.PASSIVE, False, True, True, True, Action.TAKE_OVER),  # both restarted, we served last
    (Role.PASSIVE, Role.PASSIVE, False, False, True, True, Action.STAY),  # the peer served last
    (Role.PASSIVE, Role.STOPPED, False, True, True, False, Action.STAY),  # and we are cut from the network
    (Role.PASSIVE, Role.PASSIVE, False, True, False, True, Action.STAY),  # our copies are not current
]


@pytest.mark.parametrize(
    ("role", "heard", "ping", "current", "peer_role", "peer_ping", "answered", "forced", "action"), ROWS
)
def test_decision_table(role, heard, ping, current, peer_role, peer_ping, answered, forced, action):
    seen = Observation(role, heard, ping, current, peer_role, peer_ping, answered, forced)
    decision = decide(seen)
    assert decision.action is action, decision.reason
    assert decision.reason


@pytest.mark.parametrize(("role", "peer_role", "later", "last", "current", "ping", "action"), MEETINGS)
def test_nodes_that_meet_again(role, peer_role, later, last, current, ping, action):
    seen = Observation(role, True, ping, current, peer_role, True, peer_active_later=later, active_last=last)
    decision = decide(seen)
    assert decision.action is action, decision.reason


def every_observation():
    roles = (Role.ACTIVE, Role.PASSIVE, Role.STOPPED)
    flags = (False, True)
    for role, heard, ping, current, peer_role, peer_ping, answered, forced in itertools.product(
        roles, flags, flags, flags, (None, *roles), (None, False, True), flags, flags
    ):
        for later, last in ((False, False), (True, False), (False, True)):
            yield Observation(role, heard, ping, current, peer_role, peer_ping, answered, forced, later, last)


def test_an_isolated_node_never_takes_over_and_an_isolated_active_stops():
    for seen in every_observation():
        if not seen.ping_node_reached and not seen.peer_heard:
            action = decide(seen).action
            assert action is not Action.TAKE_OVER, seen
            if seen.role is Role.ACTIVE:
                assert action is Action.STOP_SERVING, seen


def test_no_takeover_while_a_virtual_ip_answers():
    for seen in every_observation():
        if seen.address_answered:
            assert decide(seen).action is not Action.TAKE_OVER, seen


def test_a_node_heard_by_its_peer_takes_over_only_to_resume_when_neither_serves():
    for seen in every_observation():
        if seen.peer_heard and decide(seen).action is Action.TAKE_OVER:
            assert seen.peer_role is not Role.ACTIVE and seen.active_last and seen.copies_current, seen


def test_a_stale_copy_takes_over_only_when_forced():
    for seen in every_observation():
        if decide(seen).action is Action.TAKE_OVER and not seen.copies_current:
            assert seen.forced, seen


def test_only_an_active_node_stops_serving_or_hands_over():
    for seen in every_observation():
        if decide(seen).action in (Action.STOP_SERVING, Action.HAND_OVER):
            assert seen.role is Role.ACTIVE, seen
