"""Who should serve: the failover decision, a pure function of what this node observes.

Kept apart from the role change (promoting or demoting a node) so that another decider,
Pacemaker through an OCF agent, can drive the same role change. The rules are the
reference's (Open-E DSS: the ping node tells a dead peer from an isolated self; DataKeeper:
only a current copy may become the source), made safe where the reference leaves a gap:

- An isolated node never takes over, and an isolated active node stops serving (removes
  its virtual IPs, disables its targets) so that two active nodes never exist.
- A passive node takes over only when its copies were in sync, unless the administrator
  forces it; and never while someone on the data network still answers for a virtual IP
  (a peer whose daemon hangs, or whose heartbeat and auxiliary paths are both cut, may
  still serve).
- An active node whose data network is gone while the peer still reaches the ping node
  hands over: a planned switchover, since the peer is alive.
- No automatic failback: a node that comes back stays passive; one that still believes it
  serves, and hears a peer that took over after it, stops serving.
- Neither node serving while both hear each other (both restarted): the one that was
  active last resumes, its copies being the current ones.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    ACTIVE = "active"
    PASSIVE = "passive"
    # Failover not started on this node (or stopped by the administrator).
    STOPPED = "stopped"


class Action(enum.Enum):
    STAY = "stay"
    TAKE_OVER = "take-over"
    STOP_SERVING = "stop-serving"
    HAND_OVER = "hand-over"
    REFUSE_TAKEOVER = "refuse-takeover"


@dataclass(frozen=True)
class Observation:
    """What one node knows when it decides.

    ``peer_heard``: an authenticated heartbeat arrived over some path within the deadline.
    ``peer_role`` and ``peer_reaches_ping_node`` are what the peer said last (None: never).
    ``copies_current``: every protected volume's copy here was in sync when last known.
    ``address_answered``: someone on the data network answered for a virtual IP (asked only
    when a takeover is considered; False otherwise).
    ``peer_active_later``: the peer says it is active, and became so after this node did.
    ``active_last``: this node became active after the peer last did (it was the last to serve).
    """

    role: Role
    peer_heard: bool
    ping_node_reached: bool
    copies_current: bool
    peer_role: Role | None = None
    peer_reaches_ping_node: bool | None = None
    address_answered: bool = False
    forced: bool = False
    peer_active_later: bool = False
    active_last: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(seen: Observation) -> Decision:
    """The action for ``seen``, with the reason shown to the administrator."""
    if seen.role is Role.STOPPED:
        return Decision(Action.STAY, "failover is not started on this node")
    if seen.role is Role.ACTIVE:
        return _decide_active(seen)
    decision = _decide_passive(seen)
    if decision.action is Action.TAKE_OVER and seen.address_answered:
        return Decision(
            Action.REFUSE_TAKEOVER, "a virtual IP still answers on the data network: someone may still serve it"
        )
    return decision


def _decide_active(seen: Observation) -> Decision:
    if seen.peer_heard and seen.peer_role is Role.ACTIVE and seen.peer_active_later:
        return Decision(Action.STOP_SERVING, "the peer took over while this node was away; no automatic failback")
    if seen.ping_node_reached:
        return Decision(Action.STAY, "serving: the ping node answers")
    if not seen.peer_heard:
        return Decision(Action.STOP_SERVING, "isolated: neither the peer nor any ping node answers")
    if seen.peer_reaches_ping_node:
        return Decision(Action.HAND_OVER, "this node's data network is down; the peer reaches the ping node")
    return Decision(Action.STAY, "no ping node answers either node: the ping nodes are down, not the data network")


def _decide_passive(seen: Observation) -> Decision:
    if seen.peer_heard:
        if seen.peer_role is Role.ACTIVE:
            return Decision(Action.STAY, "the peer serves")
        if seen.active_last and seen.copies_current and seen.ping_node_reached:
            return Decision(Action.TAKE_OVER, "neither node serves and this node was active last: resuming")
        return Decision(Action.STAY, "the peer is alive; failback and switchover are the administrator's")
    if not seen.ping_node_reached:
        return Decision(Action.STAY, "isolated: an isolated node never takes over")
    if not seen.copies_current and not seen.forced:
        return Decision(
            Action.REFUSE_TAKEOVER, "this node's copies were not in sync: taking over would serve stale data"
        )
    if not seen.copies_current:
        return Decision(Action.TAKE_OVER, "forced by the administrator with copies that were not in sync")
    return Decision(Action.TAKE_OVER, "the peer is silent on every path and the ping node answers")
