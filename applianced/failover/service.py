"""The failover of this node: settings, the heartbeat exchange, the decision loop, the role change.

Each interval the node pings its ping nodes and exchanges a beat with the peer (both at
once, each bounded by the interval), decides (``decision.decide``) and acts. Taking over
promotes the local copies of the protected disks (``Replication.promote``), serves them
in the commit that enables the protected targets, adds the virtual IPs, announces them and
resets the clients' old connections; stopping serving removes the virtual IPs (a planned
switchover keeps them, their portals held, until the copies have changed hands). When the
node idles it keeps its addresses as its role says (an IPv6 address vanishes when its
link goes down: it is added again when the link is back). Every step is idempotent, so a
daemon restarted in the middle of a role change finishes it or undoes it on its next look.

Settings change only while failover is stopped on this node; ``start`` on the node that is
to serve sends them to the peer, which becomes the passive node. No D-Bus here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from applianced import decoding
from applianced.engine import Appliance, audit
from applianced.errors import (
    AlreadyExists,
    ApplianceError,
    Busy,
    Incomplete,
    InvalidArgument,
    KernelError,
    NotFound,
    Unreachable,
)
from applianced.failover import addresses, announce, pingnode, targets, tickle
from applianced.failover import messages as m
from applianced.failover.addresses import VirtualAddress, check_interface
from applianced.failover.decision import Action, Decision, Observation, Role, decide
from applianced.failover.records import Event, FailoverRecord, FailoverStore, PingNode, check_heartbeat
from applianced.peer.link import PeerRefused, PeerUnreachable
from applianced.peer.service import Peer
from applianced.replication.records import SOURCE, SYNC, TARGET
from applianced.replication.service import Half, Replication
from applianced.replication.states import MirrorState
from applianced.state import Config
from applianced.steps import Steps, describe, log_failure
from applianced.validation import canonical_address

log = logging.getLogger(__name__)

T = TypeVar("T")
# The peer's answers to a start, a stop or a hand-over may take a role change.
SLOW_REQUEST = 30.0
# The failover's own threads: a beat's worth of echoes per ping node, for a few ping
# nodes, and its reads and changes of addresses and connections.
MAX_OWN_THREADS = 16
# The longest an echo is waited for: the daemon's exit waits for the echoes in flight.
MAX_ECHO_WAIT = 5.0
# A look that takes longer than this many intervals before it decides does not decide: in
# a 64-LUN takeover's clean-up one waited 5 s for the daemon's threads, then found its ping
# reply 5 s old, and the active node stopped serving.
LOOK_HELD_UP = 2
# The nodes' clocks may differ this much at start (the reference requires agreeing clocks).
MAX_CLOCK_OFFSET = 1.0


class Failover:
    """This node's part in the cluster (the bus layer calls these methods)."""

    def __init__(self, directory: Path, engine: Appliance, peer: Peer, replication: Replication) -> None:
        self.store = FailoverStore(directory)
        self.engine = engine
        self.peer = peer
        self.replication = replication
        self.record = FailoverRecord()
        self.decision = Decision(Action.STAY, "failover is not started on this node")
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._peer_beat: m.Beat | None = None
        self._peer_heard = float("-inf")  # monotonic
        # When a ping node last answered (monotonic), and the pings in flight.
        self._last_reply = float("-inf")
        self._pinging = 0
        # No decision before this moment (monotonic): after a start or a role change the
        # node first rebuilds what it sees (a takeover may hold the look up for seconds).
        self._quiet_until = 0.0
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_OWN_THREADS, thread_name_prefix="failover"
        )
        # The passive node's copies were current when the peer was last heard.
        self._copies_current = False
        self._protected: tuple[str, ...] = ()
        self._forced = False
        self._yielding: asyncio.Future[None] | None = None
        self._hand_over_looks = 0
        # What the peer last accepted of what it keeps ready (active node), by kind and name.
        self._pushed: dict[tuple[str, str], Any] = {}
        self._pushing: asyncio.Future[None] | None = None
        self._announcing: asyncio.Future[Any] | None = None
        self._promoting: asyncio.Future[None] | None = None
        # A passive node's question "does anyone answer for the VIPs?", asked as its peer
        # fell silent: when (monotonic) and the answer (``_early_probe``).
        self._early_probe: tuple[float, asyncio.Future[bool]] | None = None
        # The clients' connections to the virtual IPs: this node's own when active, the
        # active peer's as it last said otherwise.
        self.client_connections: tuple[tickle.Connection, ...] = ()
        self.counters = dict.fromkeys(
            ("beats_sent", "beats_answered", "beats_received", "silences", "stalls", "connections_reset"), 0
        )
        for kind, handler in self._handlers().items():
            peer.handle(kind, handler)
        engine.add_guard(self._refuse_changes_to_protected)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change of settings, role, decision or what is heard."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    @property
    def role(self) -> Role:
        return Role(self.record.role)

    @property
    def peer_heard(self) -> bool:
        return time.monotonic() - self._peer_heard < self.record.deadline

    def _peer_heard_for_takeover(self) -> bool:
        # One interval more than an isolated active node takes to stop serving: it is gone
        # from the network before this node adds the addresses.
        return time.monotonic() - self._peer_heard < self.record.deadline + self.record.interval

    @property
    def ping_node_reached(self) -> bool:
        return time.monotonic() - self._last_reply < self.record.deadline

    def _quiet(self) -> None:
        self._quiet_until = time.monotonic() + self.record.deadline + self.record.interval

    async def start_up(self) -> None:
        """Load the record. A node that served before a reboot (its addresses gone) comes
        back passive: it serves again only once the decision says so."""
        record = await self._on_own_thread(self.store.load)
        if record.role == Role.ACTIVE.value and record.addresses:
            present = await self._on_own_thread(addresses.present, list(record.addresses))
            if not present:
                record = dataclasses.replace(record, role=Role.PASSIVE.value)
                log.info("failover: this node served before it restarted; passive until the peer is heard")
        self.record = record
        self._quiet()

    def _refuse_changes_to_protected(self, current: Config, new: Config) -> None:
        """On the passive node the protected targets are the active node's, kept ready: a
        change here would be lost at the next push, or served at a takeover unasked."""
        if self.role is not Role.PASSIVE:
            return
        for name in self.record.targets:
            if current.targets.get(name) != new.targets.get(name):
                active = self.peer.record.peer_address if self.peer.record else "the peer"
                raise Busy(
                    f"target {name!r} is protected by failover and this node is passive: "
                    f"change it on the active node ({active})"
                )

    # -- settings ---------------------------------------------------------------------

    async def add_address(self, interface: str, text: str) -> None:
        vip = VirtualAddress.parse(interface, text)
        await self._change(lambda r: _added(r, "addresses", vip, f"virtual IP {vip.address}", _same_address))

    async def remove_address(self, interface: str, text: str) -> None:
        vip = VirtualAddress.parse(interface, text)
        await self._change(lambda r: _removed(r, "addresses", vip, f"virtual IP {vip}"))

    async def add_ping_node(self, address: str, interface: str) -> None:
        node = PingNode(canonical_address(address), check_interface(interface))
        await self._change(lambda r: _added(r, "ping_nodes", node, f"ping node {node.address}", _same_ping_node))

    async def remove_ping_node(self, address: str) -> None:
        address = canonical_address(address)
        found = next((node for node in self.record.ping_nodes if node.address == address), None)
        if found is None:
            raise NotFound(f"{address} is not a ping node")
        await self._change(lambda r: _removed(r, "ping_nodes", found, f"ping node {address}"))

    async def protect(self, target: str) -> None:
        if target not in self.engine.config.targets:
            raise NotFound(f"target {target!r} does not exist")
        await self._change(lambda r: _added(r, "targets", target, f"target {target!r}", lambda a, b: a == b))

    async def unprotect(self, target: str) -> None:
        await self._change(lambda r: _removed(r, "targets", target, f"target {target!r}"))

    async def set_heartbeat(self, interval: float, misses: int) -> None:
        check_heartbeat(interval, misses)
        await self._change(lambda r: dataclasses.replace(r, interval=interval, misses=misses))

    async def _change(self, change: Callable[[FailoverRecord], FailoverRecord]) -> None:
        async with self._lock:
            if self.role is not Role.STOPPED:
                raise Busy(f"failover runs on this node ({self.role.value}): stop it to change its settings")
            await self._save(change(self.record))
        self._notify()

    # -- checks, start and stop ---------------------------------------------------------

    async def problems(self) -> list[str]:
        """Everything that keeps this node from starting the cluster as its active node."""
        found = self._setting_problems(self.record)
        status = self.peer.status()
        if status is None:
            found.append("this node is not paired")
        elif not status.connected:
            found.append("the peer is not connected")
        elif status.clock_offset is not None and abs(status.clock_offset) > MAX_CLOCK_OFFSET:
            found.append(f"the nodes' clocks differ by {status.clock_offset:+.2f} s: synchronise them (NTP)")
        found += self._target_problems()
        found += self._portal_problems()
        found += await self._network_problems(self.record, active=True)
        return found

    def _portal_problems(self) -> list[str]:
        # A portal on a virtual IP could not be built on the passive node (the address is
        # not there): the protected targets are reached through a wildcard portal.
        if any(portal.address in ("0.0.0.0", "::") for portal in self.engine.config.portals):
            return []
        return ["no portal listens on the virtual IPs: create one on 0.0.0.0 (or ::)"]

    def _setting_problems(self, record: FailoverRecord) -> list[str]:
        found = []
        if not record.addresses:
            found.append("no virtual IP is configured")
        if not record.ping_nodes:
            found.append("no ping node is configured")
        if not record.targets:
            found.append("no target is protected")
        return found

    def _target_problems(self) -> list[str]:
        found = []
        halves = {half.disk: half for half in self.replication.halves()}
        for name in self.record.targets:
            target = self.engine.config.targets.get(name)
            if target is None:
                found.append(f"protected target {name!r} does not exist")
                continue
            if not target.luns:
                found.append(f"protected target {name!r} has no LUN")
            for lun in target.luns:
                disk = self.engine.config.disks[lun.disk]
                half = halves.get(lun.disk)
                where = f"disk {lun.disk!r} (LUN {lun.number} of {name!r})"
                if disk.write_back:
                    found.append(f"{where} has write-back caching on: a failover would lose acknowledged writes")
                if half is None:
                    found.append(f"{where} is not mirrored to the peer")
                elif half.role != SOURCE:
                    found.append(f"{where} is the peer's copy here, not the source")
                elif half.mode != SYNC:
                    found.append(f"{where} is mirrored in {half.mode} mode: failover needs sync mode")
                elif half.state is not MirrorState.MIRRORING:
                    found.append(f"{where} is {half.state.name.lower().replace('_', ' ')}: its copy is not in sync")
        return found

    def _own_target_problems(self, names: Sequence[str]) -> list[str]:
        """On the node to be passive: targets of the protected names that serve this node's
        own disks. The active node's definitions would replace them, so the start is
        refused instead; a target kept from an earlier start serves only copies."""
        copies = {half.disk for half in self.replication.halves() if half.role == TARGET}
        found = []
        for name in names:
            target = self.engine.config.targets.get(name)
            own = sorted({lun.disk for lun in target.luns if lun.disk not in copies}) if target else []
            if own:
                found.append(
                    f"target {name!r} exists here, serving this node's own disk(s) {', '.join(own)}: "
                    "the active node's definition would replace it (rename or delete it here)"
                )
        return found

    async def _network_problems(self, record: FailoverRecord, active: bool) -> list[str]:
        """Interfaces, ping nodes and (on the node that will serve) addresses in use."""

        async def vip_problem(vip: VirtualAddress) -> str:
            if not await self._on_own_thread(_interface_exists, vip.interface):
                return f"interface {vip.interface} of virtual IP {vip.address} does not exist on this node"
            if active and not await self._on_own_thread(addresses.present, [vip]):
                try:
                    holder = await self._on_own_thread(announce.in_use, vip)
                except KernelError as exc:
                    return str(exc)
                if holder:
                    return f"virtual IP {vip.address} is in use on the network already (by {holder})"
            return ""

        async def ping_problem(node: PingNode) -> str:
            if await self._echo(node, 1.0) is None:
                return f"ping node {node.address} does not answer over {node.interface}"
            return ""

        checks = [vip_problem(vip) for vip in record.addresses] + [ping_problem(node) for node in record.ping_nodes]
        return [problem for problem in await asyncio.gather(*checks) if problem]

    async def start(self) -> None:
        """Start the cluster with this node active, its peer passive (the reference's Start)."""
        async with self._lock:
            if self.role is Role.ACTIVE:
                return
            if self.role is Role.PASSIVE:
                raise Busy("this node is the passive node: switch over to make it active")
            found = await self.problems()
            if not found:
                answer = await self._ask(m.START, m.Start(self.record), m.Problems, SLOW_REQUEST)
                found = [f"on the peer: {problem}" for problem in answer.problems]
            if found:
                raise InvalidArgument("failover cannot start: " + "; ".join(found))
            self._peer_heard = time.monotonic()
            await self._take_over(Decision(Action.TAKE_OVER, "started by the administrator"))

    async def stop(self) -> None:
        """Stop failover on both nodes; the active node keeps serving, without failover."""
        async with self._lock:
            if self.role is Role.STOPPED:
                return
            try:
                await self._ask(m.STOP, m.Reason("stopped by the administrator"), m.Done)
            except Unreachable:
                log.warning("failover stopped here; the peer did not answer and stops on its own start")
            await self._become(Role.STOPPED, "stopped by the administrator")

    async def switchover(self) -> None:
        """Hand the service over to the peer (planned failover, manual failback)."""
        async with self._lock:
            if self.role is not Role.ACTIVE:
                raise Busy(f"this node is {self.role.value}: switch over on the active node")
            await self._hand_over("switchover by the administrator")

    async def take_over(self, force: bool = False) -> None:
        """On the passive node: allow the next takeover even with copies not in sync
        (``force``); the decision still needs the peer silent and the ping node reached."""
        if self.role is not Role.PASSIVE:
            raise Busy(f"this node is {self.role.value}: only the passive node takes over")
        self._forced = force
        self._notify()

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        late = 0.0
        while True:
            started = time.monotonic()
            if self.role is not Role.STOPPED:
                try:
                    await self.tick(stalled=late > self.record.interval)
                except Exception:
                    log.exception("failover: the look at the cluster failed")
            pause = max(0.0, self.record.interval - (time.monotonic() - started))
            due = time.monotonic() + pause
            await asyncio.sleep(pause)
            # How much later than asked the loop woke this task: the daemon was held up.
            late = time.monotonic() - due

    async def tick(self, stalled: bool = False) -> None:
        """One look: ping, beat, decide, act. ``stalled``: the loop woke it late."""
        started = time.monotonic()
        before = (self.peer_heard, self.ping_node_reached, len(self.client_connections))
        self._ping()
        await self._beat()
        if self.role is Role.PASSIVE:
            self._probe_early()
        if self.role is Role.ACTIVE:
            # Read off the loop (a busy server's socket table is long); the next beat carries it.
            vips = [vip.address for vip in self.record.addresses]
            self.client_connections = await self._on_own_thread(tickle.established, vips)
        held_up = time.monotonic() - started
        if stalled or held_up > LOOK_HELD_UP * self.record.interval:
            # This node was held up (its loop woke the look late, or the look's own steps
            # took long; a dead peer's beat takes one interval): the peer's beats of that
            # time may still be unread, and the echo it counts went out when it began. No
            # decision on that silence.
            self.counters["stalls"] += 1
            how = "came late" if stalled else f"was held up {held_up:.1f} s"
            log.warning("failover: this node's look %s; deciding at the next one", how)
            return
        if time.monotonic() < self._quiet_until:
            return
        if self._lock.locked():
            # A role change is under way (a switchover's hand-over, a request of the peer's):
            # the look does not wait for it, so that the beats go on. A 64-LUN hand-over held
            # the lock 10 s, its node's beats stopped, and the peer took over on that silence.
            return
        async with self._lock:
            if self.role is Role.STOPPED:
                return
            decision = await self._decide()
            await self._act(decision)
            if self.role is Role.ACTIVE and self.peer_heard:
                self._push_to_peer()
            elif not self.peer_heard:
                self._pushed = {}  # a peer back from silence gets everything again
        if (self.peer_heard, self.ping_node_reached, len(self.client_connections)) != before:
            self._notify()

    def _ping(self) -> None:
        """Ask each ping node in the background, each echo given the whole deadline: an
        answer late because this node is busy (an emulated CPU, a reconcile) still counts."""
        nodes = self.record.ping_nodes
        if self._pinging >= self.record.misses * len(nodes):
            return
        for node in nodes:
            self._pinging += 1
            echo = self._echo(node, min(self.record.deadline, MAX_ECHO_WAIT))
            echo.add_done_callback(self._pinged)

    def _echo(self, node: PingNode, timeout: float) -> asyncio.Future[float | None]:
        """One echo to ``node``: its round trip, None if unanswered."""
        return self._on_own_thread(pingnode.reaches, node.address, node.interface, timeout)

    def _on_own_thread(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``function(*args)`` on the failover's own threads, never queued behind the
        daemon's: a 64-LUN takeover's clean-up filled that pool for 6 s, and a look that
        waited there for the client connections decided on a ping reply counted before."""
        return asyncio.get_running_loop().run_in_executor(self._threads, function, *args)

    def _pinged(self, echo: asyncio.Future[float | None]) -> None:
        self._pinging -= 1
        if not echo.cancelled() and echo.exception() is None and echo.result() is not None:
            self._last_reply = time.monotonic()

    async def _ping_now(self, timeout: float = 1.0) -> bool:
        """Whether a ping node answers this node now (all are asked at once)."""
        results = await asyncio.gather(*(self._echo(node, timeout) for node in self.record.ping_nodes))
        return any(result is not None for result in results)

    def _own_beat(self) -> m.Beat:
        connections = self.client_connections if self.role is Role.ACTIVE else ()
        return m.Beat(
            self.record.role, self.ping_node_reached, self.record.active_since, self._protected_disks(), connections
        )

    async def _beat(self) -> None:
        self.counters["beats_sent"] += 1
        try:
            body = await self.peer.request(
                m.BEAT, _pack(self._own_beat()), timeout=self.record.interval, attempts=1, every_path=True
            )
        except (PeerUnreachable, PeerRefused):
            return
        self.counters["beats_answered"] += 1
        self._heard(decoding.unpack(body, m.Beat, "a Beat message"))

    def _heard(self, beat: m.Beat) -> None:
        now = time.monotonic()
        if now - self._peer_heard >= self.record.deadline and self._peer_heard > float("-inf"):
            # The peer went unheard for as long as the decision calls silence (an outage,
            # or beats held up past their deadline).
            self.counters["silences"] += 1
        self._peer_beat = beat
        self._peer_heard = now
        if beat.role == Role.ACTIVE.value:
            # The active node says what is protected; a passive node's view is its echo.
            self._protected = beat.protected
            if self.role is not Role.ACTIVE:
                self.client_connections = beat.connections
        if self.role is not Role.ACTIVE:
            self._copies_current = self._copies_in_sync()

    def _protected_disks(self) -> tuple[str, ...]:
        """This node's protected disks: those of its protected targets, and its copies of
        the disks the peer protected when it was active (their names here)."""
        targets = (self.engine.config.targets.get(name) for name in self.record.targets)
        disks = {lun.disk for target in targets if target for lun in target.luns}
        return tuple(sorted(disks | {half.disk for half in self._local_copies()}))

    def _local_targets(self) -> list[str]:
        """The protected targets this node has (its own, or the active node's prepared)."""
        return [name for name in self.record.targets if name in self.engine.config.targets]

    def _push_to_peer(self) -> None:
        """On the active node: send what the passive node keeps ready and that changed since
        it last took it, in the background (a look never waits for the peer's reconcile)."""
        if self._pushing is not None or self.peer.record is None:
            return
        self._pushing = asyncio.ensure_future(self._send_changes())
        self._pushing.add_done_callback(self._pushed_changes)

    def _pushed_changes(self, task: asyncio.Future[None]) -> None:
        self._pushing = None
        _log_failure("what the passive node keeps ready did not reach it")(task)

    async def _send_changes(self) -> None:
        """The protected targets, and the persistent reservations (APTPL) that LIO saved for
        their disks: initiators that made them persistent find them after a takeover."""
        assert self.peer.record is not None
        key = self.peer.record.key
        for name in self._local_targets():
            target = self.engine.config.targets[name]
            if self._pushed.get(("target", name)) != target:
                await self._ask(m.PREPARE_TARGET, targets.outgoing(target, key), m.Done, SLOW_REQUEST)
                self._pushed[("target", name)] = target
        for disk, saved in (await self.engine.saved_reservations(self._protected_disks())).items():
            if self._pushed.get(("reservations", disk)) != saved:
                await self._ask(m.PREPARE_RESERVATIONS, m.SavedReservations(disk, saved), m.Done, SLOW_REQUEST)
                self._pushed[("reservations", disk)] = saved

    def _protected_sources(self) -> list[str]:
        """The protected disks whose mirror this node is the source of."""
        protected = set(self._protected_disks())
        return [half.disk for half in self.replication.halves() if half.disk in protected and half.role == SOURCE]

    def _local_copies(self) -> list[Half]:
        """This node's halves of the disks the active node protects."""
        return [half for half in self.replication.halves() if half.peer_disk in self._protected]

    def _copies_in_sync(self) -> bool:
        copies = self._local_copies()
        if len(copies) < len(self._protected):
            return False
        return all(
            half.role == SOURCE or (half.mode == SYNC and half.state is MirrorState.MIRRORING) for half in copies
        )

    async def _decide(self) -> Decision:
        beat = self._peer_beat
        heard = self.peer_heard if self.role is Role.ACTIVE else self._peer_heard_for_takeover()
        peer_role = Role(beat.role) if beat else None
        seen = Observation(
            role=self.role,
            peer_heard=heard,
            ping_node_reached=self.ping_node_reached,
            copies_current=self._copies_in_sync() if heard or self.role is Role.ACTIVE else self._copies_current,
            peer_role=peer_role,
            peer_reaches_ping_node=beat.ping_node_reached if beat else None,
            forced=self._forced,
            peer_active_later=bool(beat and peer_role is Role.ACTIVE and beat.active_since > self.record.active_since),
            active_last=bool(beat and self.record.active_since > beat.active_since),
        )
        decision = decide(seen)
        if decision.action is Action.TAKE_OVER:
            answered = await self._answered_for_takeover()
            decision = decide(dataclasses.replace(seen, address_answered=answered))
        return decision

    def _probe_early(self) -> None:
        """Once per silence of the peer, as it begins (the last interval before a takeover
        may follow): ask in the background whether anyone answers for the VIPs, so that a
        takeover finds the answer ready. Asked at the takeover, two probes of 0.3 s each
        without an answer came on top of every crash's stall."""
        if self.peer_heard or not self._peer_heard_for_takeover():
            return  # heard; or silent for longer, and a takeover asks for itself
        if self._early_probe is not None and self._early_probe[0] > self._peer_heard:
            return  # asked in this silence already
        probe = asyncio.ensure_future(self._addresses_answered())
        probe.add_done_callback(_log_failure("the question who holds the virtual IPs failed"))
        self._early_probe = (time.monotonic(), probe)

    async def _answered_for_takeover(self) -> bool:
        """Whether someone answers for a VIP, before a takeover: the early probe's "nobody"
        if it was asked in this silence, at most two intervals ago (nobody can have taken
        the addresses since but a peer taking over too, which a probe now would not see
        either); otherwise, and after a "somebody" (an isolated active node lets go of
        them as this node's peer falls silent), asked now."""
        early, self._early_probe = self._early_probe, None
        asked, probe = early or (float("-inf"), None)
        if probe is not None and asked > self._peer_heard and time.monotonic() - asked <= 2 * self.record.interval:
            with contextlib.suppress(Exception):  # logged by its callback; asked again below
                if not await probe:
                    return False
        return await self._addresses_answered()

    async def _addresses_answered(self) -> bool:
        """Whether someone answers for a VIP; True when this node cannot even ask (its data
        NIC gone or down): a node that cannot tell does not take over."""
        vips = list(self.record.addresses)
        try:
            holders = await asyncio.gather(*(self._on_own_thread(announce.in_use, vip) for vip in vips))
        except KernelError as exc:
            log.warning("failover: %s; no takeover", exc)
            return True
        return any(holders)

    async def _act(self, decision: Decision) -> None:
        previous = self.decision
        if decision.action is not Action.HAND_OVER:
            self._hand_over_looks = 0
        if decision.action is Action.TAKE_OVER:
            await self._take_over(decision)
        elif decision.action is Action.STOP_SERVING:
            await self._stop_serving(decision.reason)
        elif decision.action is Action.HAND_OVER and self._hand_over_looks < self.record.misses:
            # The peer's word that it reaches the ping node may predate the ping node's own
            # failure: the case must hold for as many looks as a silence takes.
            self._hand_over_looks += 1
            self.decision = Decision(Action.STAY, f"{decision.reason}: handing over if it lasts")
        elif decision.action is Action.HAND_OVER:
            try:
                await self._hand_over(decision.reason)
            except ApplianceError as exc:
                # Serving on here is better than nobody serving: tried again next look.
                self.decision = Decision(Action.STAY, f"{decision.reason}, but the hand-over failed: {exc}")
        else:
            if decision != previous and decision.action is Action.REFUSE_TAKEOVER:
                await self._save(self.record.with_event(Event(time.time(), "refused", decision.reason)))
                audit("failover-refused", "cluster", "warning", f"failover: no takeover: {decision.reason}")
            self.decision = decision
            await self._keep_role()
        if self.role is Role.PASSIVE and self._yielding is None and self._peer_took_over():
            # In the background: a replication step may wait for a resync's turn, and the
            # looks (pings, beats, decisions) must go on meanwhile.
            self._yielding = asyncio.ensure_future(self._yield_copies())
            self._yielding.add_done_callback(self._yielded)
        if self.decision != previous:
            log.info("failover: %s: %s", self.decision.action.value, self.decision.reason)
            self._notify()

    async def _keep_role(self) -> None:
        """What the role holds, kept: an active node's VIPs, a passive node's silence."""
        vips = list(self.record.addresses)
        present = await self._on_own_thread(addresses.present, vips)
        if self.role is Role.ACTIVE:
            missing = [vip for vip in vips if vip not in present]
            for vip in missing:
                log.warning("failover: virtual IP %s was gone; adding it again", vip)
                await self._on_own_thread(addresses.add, vip)
            await asyncio.gather(*(self._on_own_thread(announce.announce, vip) for vip in missing))
        elif self.role is Role.PASSIVE:
            for vip in present:
                log.warning("failover: virtual IP %s is here on the passive node; removing it", vip)
                await self._on_own_thread(addresses.remove, vip)
            # A node that served before a reboot restored its targets enabled.
            enabled = [name for name in self._local_targets() if self.engine.config.targets[name].enabled]
            if enabled:
                await self.engine.set_targets_enabled(enabled, False)

    # -- role changes -------------------------------------------------------------------

    async def _take_over(self, decision: Decision) -> None:
        steps = Steps()
        copies = [half.disk for half in self._local_copies() if half.role == TARGET]
        await steps.run("promote copies", self._promote_copies(copies))
        try:
            await self._serve(decision, steps)
        finally:
            if copies:
                # After the clients are served (or the takeover failed), in the background:
                # with 64 disks it took 10 s under emulation, which neither the clients' stall
                # nor this node's next decisions (an isolated node stops serving) wait for.
                self._promoting = asyncio.ensure_future(self.replication.promoted(copies))
                self._promoting.add_done_callback(_log_failure("the promoted copies' exports were not stopped"))

    async def _serve(self, decision: Decision, steps: Steps) -> None:
        """The takeover's steps after the promotion: the targets, the VIPs, the clients."""
        # A node that serves holds no portal (serving again after a failed switchover).
        await self.engine.hold_portals(())
        await steps.run("enable targets", self.engine.set_targets_enabled(self._local_targets(), True))
        vips = list(self.record.addresses)
        for vip in vips:
            await steps.run(f"add {vip.address}", self._on_own_thread(addresses.add, vip))
        # Once now, so that the resets below reach the clients through this node; the
        # repetitions (for a lost frame, a slow switch) go on in the background.
        await steps.run("announce", asyncio.gather(*(self._on_own_thread(announce.announce, vip, 1) for vip in vips)))
        if self.client_connections:
            await steps.run("reset connections", self._reset_connections())
        self._announcing = asyncio.ensure_future(self._announce_again(vips))
        self._announcing.add_done_callback(_log_failure("the virtual IPs could not be announced again"))
        self._forced = False
        await self._become(Role.ACTIVE, decision.reason, steps.done, active_since=time.time())

    async def _announce_again(self, vips: list[VirtualAddress]) -> None:
        await asyncio.sleep(announce.ANNOUNCE_INTERVAL)
        repeats = announce.ANNOUNCEMENTS - 1
        await asyncio.gather(*(self._on_own_thread(announce.announce, vip, repeats) for vip in vips))

    async def _reset_connections(self) -> None:
        """The initiators learn now, not at their own timeout, that their connections died."""
        try:
            reset = await self._on_own_thread(tickle.reset, self.client_connections)
        except KernelError as exc:
            log.warning("failover: %s; the initiators reconnect at their own timeout", exc)
            return
        self.counters["connections_reset"] += reset

    async def _promote_copies(self, copies: list[str]) -> None:
        """The copies become sources, in one pass; the targets' enable commit serves their
        LUNs (made in advance over the prepared arrays, or made then)."""
        if copies:
            await self.replication.promote(copies)

    async def _stop_serving(self, reason: str, handing_over: bool = False) -> None:
        """Stop serving; ``handing_over`` (a switchover) keeps the VIPs, their portals held,
        for ``_hand_over`` to remove once the peer can take them. (A daemon that stops in
        between finds them at its first look, passive, and removes them.)"""
        steps = Steps()
        if handing_over:
            await steps.run("hold portals", self._hold_portals())
        else:
            await self._remove_addresses(steps)
        await steps.run("disable targets", self.engine.set_targets_enabled(self._local_targets(), False))
        self._pushed = {}
        await self._become(Role.PASSIVE, reason, steps.done)

    async def _hold_portals(self) -> None:
        """Hold the VIPs' portals, then read the clients' connections, which cannot change
        any more: the peer resets exactly those (a look's own reading may be an interval
        old, or miss a client that logged in just before)."""
        await self.engine.hold_portals(self._vip_portals())
        vips = [vip.address for vip in self.record.addresses]
        self.client_connections = await self._on_own_thread(tickle.established, vips)

    async def _remove_addresses(self, steps: Steps) -> None:
        for vip in self.record.addresses:
            await steps.run(f"remove {vip.address}", self._on_own_thread(addresses.remove, vip))

    def _vip_portals(self) -> list[tuple[str, int]]:
        """Each VIP with each port on which the protected targets listen."""
        protected = self._local_targets()
        ports = sorted(
            {portal.port for portal in self.engine.config.portals if any(portal.serves(t) for t in protected)}
        )
        return [(vip.address, port) for vip in self.record.addresses for port in ports]

    def _peer_took_over(self) -> bool:
        """The peer serves, since after this node last served, and this node still holds
        sources of protected disks."""
        beat = self._peer_beat
        if not (self.peer_heard and beat and beat.role == Role.ACTIVE.value):
            return False
        return beat.active_since > self.record.active_since and bool(self._protected_sources())

    def _yielded(self, task: asyncio.Future[None]) -> None:
        self._yielding = None
        _log_failure("this node's disks could not become copies")(task)

    async def _yield_copies(self) -> None:
        """On a passive node whose peer took over after this node last served: the peer's
        copies are the current ones, so this node's sources become copies again, their
        bitmaps kept (the peer's resync copies only what differs)."""
        sources = self._protected_sources()
        steps = Steps()
        await steps.run(f"demote {len(sources)} disk(s)", self.replication.prepare_targets(sources))
        halves = {half.disk: half for half in self.replication.halves()}
        await self._ask(m.COPIES_READY, m.Disks(tuple(halves[disk].peer_disk for disk in sources)), m.Done)
        reason = "the peer took over: this node's disks are its copies again"
        await self._save(self.record.with_event(Event(time.time(), Role.PASSIVE.value, reason, tuple(steps.done))))
        audit(
            "failover-demote",
            ",".join(sources),
            "ok",
            f"failover: {', '.join(sources)} follow the peer, which took over",
        )

    async def _hand_over(self, reason: str) -> None:
        answer = await self._ask(m.CAN_TAKE_OVER, m.Reason(reason), m.Problems)
        if answer.problems:
            raise Busy("the peer cannot take over: " + "; ".join(answer.problems))
        # The VIPs stay here while the copies change hands, their portals held: the clients'
        # sessions see silence, not a close, and are reset by the peer once it serves; a
        # client whose own timer gave up first is refused at once and retries in seconds.
        # Without a VIP its SYNs went unanswered and backed off: with 64 LUNs its stall went
        # on 8.5 s after the peer served (2026-12-07). The copies change hands through
        # replication, all of them or none (the bitmaps go with them, no split brain).
        try:
            await self._stop_serving(reason, handing_over=True)
            await self.replication.hand_over(self._protected_sources())
        except Exception as exc:
            await self._serve_again(exc)
            raise
        try:
            await self._remove_addresses(Steps())
        except Exception as exc:
            raise Incomplete(
                "the peer holds the sources of the protected disks now, but this node could not remove "
                f"its virtual IPs ({exc}), so it did not ask the peer to serve them; their portals stay "
                "held, refusing clients: see `appliancectl failover status` on both nodes"
            ) from None
        try:
            await self._ask(m.TAKE_OVER, m.HandOver(reason, self.client_connections), m.Done, SLOW_REQUEST)
        except ApplianceError as exc:
            raise Incomplete(
                "this node stopped serving and the peer holds the sources of the protected disks now, "
                f"but it did not confirm that it serves them ({exc}): see `appliancectl failover status` there"
            ) from None
        finally:
            # Only with the VIPs gone: before, this node would answer their clients again.
            try:
                await self.engine.hold_portals(())
            except KernelError as exc:
                log.warning("failover: the portals stay held until this node serves or its daemon restarts: %s", exc)

    async def _serve_again(self, failure: Exception) -> None:
        """After a switchover whose mirrors stayed here: serve as before it."""
        try:
            await self._take_over(Decision(Action.TAKE_OVER, f"the switchover failed ({failure}): serving again"))
        except Exception as exc:
            log.exception("failover: this node could not serve again after a failed switchover")
            raise Incomplete(
                f"the switchover failed ({failure}) and this node stopped serving, "
                f"but could not serve again ({exc}): see its log"
            ) from None

    async def _become(
        self, role: Role, reason: str, steps: list[tuple[str, float]] | None = None, active_since: float | None = None
    ) -> None:
        record = dataclasses.replace(
            self.record,
            role=role.value,
            active_since=self.record.active_since if active_since is None else active_since,
        ).with_event(Event(time.time(), role.value, reason, tuple(steps or ())))
        await self._save(record)
        action = {Role.ACTIVE: Action.TAKE_OVER, Role.PASSIVE: Action.STOP_SERVING}.get(role, Action.STAY)
        self.decision = Decision(action, reason)
        self._quiet()
        timing = describe(steps or [])
        audit(
            "failover-role",
            role.value,
            "ok",
            f"failover: this node is {role.value}: {reason}" + (f" ({timing})" if timing else ""),
        )
        self._notify()

    async def _save(self, record: FailoverRecord) -> None:
        await self._on_own_thread(self.store.save, record)
        self.record = record

    # -- the peer's requests ------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[bytes], Awaitable[bytes]]]:
        def handler(schema: type[T], method: Callable[[T], Awaitable[Any]], locked: bool = True):
            async def handle(body: bytes) -> bytes:
                message = decoding.unpack(body, schema, f"a {schema.__name__} message")
                if not locked:
                    return _pack(await method(message))
                async with self._lock:
                    return _pack(await method(message))

            return handle

        return {
            # Beats never wait for a role change in progress: they are what the peer hears.
            m.BEAT: handler(m.Beat, self._on_beat, locked=False),
            m.START: handler(m.Start, self._on_start),
            m.STOP: handler(m.Reason, self._on_stop),
            m.CAN_TAKE_OVER: handler(m.Reason, self._on_can_take_over),
            m.TAKE_OVER: handler(m.HandOver, self._on_take_over),
            m.COPIES_READY: handler(m.Disks, self._on_copies_ready, locked=False),
            m.PREPARE_TARGET: handler(m.PreparedTarget, self._on_prepare_target),
            m.PREPARE_RESERVATIONS: handler(m.SavedReservations, self._on_prepare_reservations),
        }

    async def _on_beat(self, beat: m.Beat) -> m.Beat:
        self.counters["beats_received"] += 1
        self._heard(beat)
        return self._own_beat()

    async def _on_start(self, ask: m.Start) -> m.Problems:
        if self.role is Role.ACTIVE:
            return m.Problems(("this node is active itself",))
        settings = dataclasses.replace(ask.settings, role=self.record.role, active_since=self.record.active_since)
        found = self._setting_problems(settings)
        found += self._portal_problems()
        found += self._own_target_problems(settings.targets)
        found += await self._network_problems(settings, active=False)
        if found:
            return m.Problems(tuple(found))
        self._peer_heard = time.monotonic()
        await self._save(dataclasses.replace(settings, history=self.record.history))
        self._last_reply = time.monotonic()  # it just answered the checks
        if self.role is not Role.PASSIVE:
            await self._become(Role.PASSIVE, "the peer started the cluster")
        return m.Problems()

    async def _on_stop(self, ask: m.Reason) -> m.Done:
        if self.role is not Role.STOPPED:
            await self._become(Role.STOPPED, f"the peer: {ask.reason}")
        return m.Done()

    async def _on_can_take_over(self, ask: m.Reason) -> m.Problems:
        found = []
        if self.role is not Role.PASSIVE:
            found.append(f"this node is {self.role.value}, not passive")
        if not await self._ping_now():
            found.append("no ping node answers this node")
        if not self._copies_in_sync():
            found.append("this node's copies of the protected disks are not in sync")
        return m.Problems(tuple(found))

    async def _on_take_over(self, ask: m.HandOver) -> m.Done:
        if self.role is not Role.ACTIVE:
            if ask.connections:
                self.client_connections = ask.connections
            await self._take_over(Decision(Action.TAKE_OVER, f"handed over by the peer: {ask.reason}"))
        return m.Done()

    async def _on_prepare_target(self, ask: m.PreparedTarget) -> m.Done:
        if self.role is Role.ACTIVE:
            raise Busy("this node is active: it serves its own definition of the protected targets")
        assert self.peer.record is not None
        copies = {half.peer_disk: half.disk for half in self.replication.halves()}
        await self.engine.adopt_targets([targets.incoming(ask, self.peer.record.key, copies)])
        return m.Done()

    async def _on_prepare_reservations(self, ask: m.SavedReservations) -> m.Done:
        if self.role is Role.ACTIVE:
            raise Busy("this node is active: its own LIO keeps the reservations of the protected disks")
        copies = {half.peer_disk: half.disk for half in self.replication.halves()}
        if ask.disk not in copies:
            raise NotFound(f"disk {ask.disk!r} has no copy on this node")
        await self.engine.keep_reservations(copies[ask.disk], ask.saved)
        return m.Done()

    async def _on_copies_ready(self, ask: m.Disks) -> m.Done:
        sources = {half.disk for half in self.replication.halves() if half.role == SOURCE}
        for disk in ask.disks:
            if disk in sources:
                # In the background: the answer must not wait for the resync to start.
                task = asyncio.ensure_future(self.replication.resume(disk))
                task.add_done_callback(_log_failure(f"the resync of {disk} to the peer did not start"))
        return m.Done()

    async def _ask(self, kind: str, message: object, answer: type[T], timeout: float = 2.0) -> T:
        body = await self.peer.ask(kind, _pack(message), timeout)
        return decoding.unpack(body, answer, f"a {answer.__name__} message")


def _log_failure(what: str) -> Callable[[asyncio.Future[Any]], None]:
    return log_failure(log, f"failover: {what}")


def _pack(message: object) -> bytes:
    return msgspec.msgpack.encode(message)


def _added(record: FailoverRecord, field_name: str, item: Any, what: str, same: Callable[[Any, Any], bool]):
    items = getattr(record, field_name)
    if any(same(item, other) for other in items):
        raise AlreadyExists(f"{what} is configured already")
    return dataclasses.replace(record, **{field_name: tuple(sorted((*items, item)))})


def _removed(record: FailoverRecord, field_name: str, item: Any, what: str):
    items = getattr(record, field_name)
    if item not in items:
        raise NotFound(f"{what} is not configured")
    return dataclasses.replace(record, **{field_name: tuple(other for other in items if other != item)})


def _same_address(a: VirtualAddress, b: VirtualAddress) -> bool:
    return a.address == b.address


def _same_ping_node(a: PingNode, b: PingNode) -> bool:
    return a.address == b.address


def _interface_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()
