"""The peer link's endpoint: UDP sockets, the handshake, paths, pings and requests.

One ``PeerLink`` runs per paired node. It sends every message to the peer's main address
or its auxiliary one (a *path* each) and accepts datagrams only from those addresses.
A datagram goes through the checks of ``protocol`` before anything acts on it; refused
ones are counted by reason and logged at most once per ``LOG_EVERY`` seconds per reason.

Handshake (three messages, the third being any message of the new session)::

    A → B  HELLO    session S, nonce Na, A's node id, A's recorded peer   (handshake key)
    B → A  WELCOME  S, Na echoed, nonce Nb, B's node id, B's recorded peer (handshake key)
    A → B  PING     first message under the keys of S, derived from the key, Na and Nb

A only accepts a WELCOME echoing a nonce it sent within ``HANDSHAKE_TIMEOUT``; B only
switches to S once a message of S verified, so a replayed HELLO costs B one WELCOME and
changes nothing. A node that is not connected sends a HELLO every ``TICK`` over the
paths in turn, so either daemon restarting is followed by a new session within seconds.
When both initiate at once the node with the lower node tag keeps its own handshake.

Every ``TICK`` a PING goes over each path; a path is up while something of the session
arrived over it within ``DEAD_AFTER``, the link is connected while one path is up. The
PONG gives the path's round-trip time and an NTP-style estimate of the peer's clock
offset (the one of the path with the shortest round trip is shown).

Requests (``request``/``handle``) are what replication will use: each has an id kept
over its retries, which go over the up paths in turn; the answering side runs a handler
once per id and answers retries from a cache, so a retried request is never executed
twice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from applianced.errors import ALL_ERRORS, ApplianceError
from applianced.peer import protocol
from applianced.peer.pairing import PairRecord
from applianced.peer.protocol import Drop, Header, MessageType, Reason, Session

log = logging.getLogger(__name__)

TICK = 1.0
# Three PINGs lost in a row: the path is down.
DEAD_AFTER = 3.5
HANDSHAKE_TIMEOUT = 5.0
# Handshakes of ours still waiting for a WELCOME, and answered ones waiting for their
# session's first message: a few, so a replay flood cannot grow memory.
MAX_PENDING = 4
# HELLO nonces answered already; a HELLO carrying one again is a replay.
SEEN_HELLOS = 1024
# Answers kept for retried requests.
ANSWERED_REQUESTS = 256
LOG_EVERY = 10.0
REQUEST_TIMEOUT = 1.0
REQUEST_ATTEMPTS = 3
RECONNECT_POLL = 0.05

Handler = Callable[[bytes], Awaitable[bytes]]
# The paths' roles, in the order of ``PairRecord.peer_addresses``.
ROLES = ("main", "aux")


class PeerUnreachable(Exception):
    """The peer did not answer (not connected, or every attempt timed out)."""


class PeerRefused(Exception):
    """The peer answered a request with an error; ``kind`` names the engine error it
    raised (``NotFound``, ``Busy``...), "" for a failure of its own."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PathStatus:
    address: str
    role: str
    up: bool
    rtt: float | None
    last_received: float


@dataclass(frozen=True)
class LinkStatus:
    """What ``appliancectl pair status`` shows; times are Unix seconds (0: never)."""

    connected: bool
    peer_node: str
    session_started: float
    paths: tuple[PathStatus, ...]
    last_message: float
    last_message_kind: str
    clock_offset: float | None
    drops: dict[str, int]


def idle_status(record: PairRecord) -> LinkStatus:
    """The status of a link that is not running: never connected, every path down."""
    return LinkStatus(
        connected=False,
        peer_node=record.peer_node,
        session_started=0.0,
        paths=tuple(
            PathStatus(address, role, False, None, 0.0)
            for address, role in zip(record.peer_addresses, ROLES, strict=False)
        ),
        last_message=0.0,
        last_message_kind="",
        clock_offset=None,
        drops=dict.fromkeys((reason.value for reason in Reason), 0),
    )


@dataclass
class _Path:
    address: str
    role: str
    transport: Any = None  # the socket that sends to it
    last_seen: float = -DEAD_AFTER  # monotonic
    last_received: float = 0.0  # wall clock
    rtt: float | None = None
    offset: float | None = None

    def up(self, now: float) -> bool:
        return now - self.last_seen < DEAD_AFTER


@dataclass
class _Initiation:
    """A HELLO of ours waiting for its WELCOME."""

    nonce: bytes
    started: float


@dataclass
class _Answered:
    """A HELLO we answered: its session starts with the first message that verifies."""

    session: Session
    peer_node: str
    started: float


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.link.received(data, addr[0])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier sends (a path's link down, no daemon on the peer yet):
        # the path's state already follows from the PINGs that go unanswered.
        log.debug("peer link socket error: %s", exc)


class PeerLink:
    """The authenticated link to the paired node."""

    def __init__(
        self,
        record: PairRecord,
        node_id: str,
        on_change: Callable[[], None],
        on_peer_identified: Callable[[str], None],
    ) -> None:
        self.record = record
        self.node_id = node_id
        self.peer_node = record.peer_node
        self._tag = protocol.node_tag(node_id)
        self._handshake_key = protocol.handshake_key(record.key)
        self._on_change = on_change
        self._on_peer_identified = on_peer_identified
        self._paths = [_Path(address, role) for address, role in zip(record.peer_addresses, ROLES, strict=False)]
        self._by_address = {path.address: index for index, path in enumerate(self._paths)}
        self._session: Session | None = None
        self._session_started = 0.0
        self._initiations: dict[int, _Initiation] = {}
        self._answered: dict[int, _Answered] = {}
        self._seen_hellos: dict[bytes, None] = {}
        self._pings: dict[int, tuple[int, float]] = {}
        self._handlers: dict[str, Handler] = {}
        self._waiting: dict[int, asyncio.Future[protocol.Response]] = {}
        self._responses: dict[int, asyncio.Task[protocol.Response]] = {}
        self._request_ids = itertools.count(secrets.randbits(62))
        self._last_message = (0.0, "")
        self.drops = dict.fromkeys((reason.value for reason in Reason), 0)
        self._last_logged: dict[Reason, float] = {}
        self._transports: list[tuple[asyncio.DatagramTransport, _Endpoint]] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        # What listeners last heard about: (connected, paths up, session, peer node).
        self._announced: tuple[Any, ...] = ()
        self._hello_turn = itertools.count()

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the sockets and start the loop of handshakes and pings."""
        loop = asyncio.get_running_loop()
        by_family: dict[int, asyncio.DatagramTransport] = {}
        for sock in _sockets(self.record):
            transport, endpoint = await loop.create_datagram_endpoint(lambda: _Endpoint(self), sock=sock)
            self._transports.append((transport, endpoint))
            by_family.setdefault(sock.family, transport)
        for path in self._paths:
            path.transport = by_family[_family(path.address)]
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop, and return once the sockets are closed (the port can be bound again)."""
        if self._task:
            self._task.cancel()
        for pending in (*self._waiting.values(), *self._responses.values()):
            pending.cancel()
        for transport, _ in self._transports:
            transport.close()
        for _, endpoint in self._transports:
            await endpoint.closed

    # -- what others use ---------------------------------------------------------------

    def status(self) -> LinkStatus:
        now = time.monotonic()
        timed = [path for path in self._paths if path.up(now) and path.rtt is not None]
        best = min(timed, key=lambda path: path.rtt or 0.0, default=None)
        return LinkStatus(
            connected=self._connected,
            peer_node=self.peer_node,
            session_started=self._session_started,
            paths=tuple(
                PathStatus(
                    path.address, path.role, path.up(now) and self._session is not None, path.rtt, path.last_received
                )
                for path in self._paths
            ),
            last_message=self._last_message[0],
            last_message_kind=self._last_message[1],
            clock_offset=best.offset if best else None,
            drops=dict(self.drops),
        )

    def handle(self, kind: str, handler: Handler) -> None:
        """Answer the peer's requests of ``kind`` with ``handler`` (body in, body out)."""
        self._handlers[kind] = handler

    async def request(
        self,
        kind: str,
        body: bytes,
        timeout: float = REQUEST_TIMEOUT,
        attempts: int = REQUEST_ATTEMPTS,
        every_path: bool = False,
    ) -> bytes:
        """The peer's answer to a request; PeerUnreachable or PeerRefused otherwise.

        Each attempt goes over the next up path; with ``every_path``, over all paths at
        once, up or not (heartbeats: a path that just died must not cost a beat, one that
        came back must carry the next). The peer runs the request once and answers every
        copy; the first answer counts. A link that is down as the request starts fails it at
        once; one that goes down on the way is waited for, one attempt's ``timeout`` long.
        """
        if not self._usable(every_path):
            raise PeerUnreachable("the peer link is not connected")
        request_id = next(self._request_ids)
        future: asyncio.Future[protocol.Response] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            for attempt in range(attempts):
                # A link that drops while a request is under way (a peer starved of CPU for
                # a few seconds, a session being renewed) gets one attempt's time to come
                # back: the peer runs the request once whenever it gets it.
                if not await self._usable_within(every_path, timeout):
                    raise PeerUnreachable(f"the peer link went down during {kind} and did not come back")
                up = self._up_paths()
                request = protocol.Request(request_id, kind, body)
                for index in range(len(self._paths)) if every_path else [up[attempt % len(up)]]:
                    self._send(index, MessageType.REQUEST, request)
                try:
                    response = await asyncio.wait_for(asyncio.shield(future), timeout)
                except TimeoutError:
                    continue
                if response.error:
                    raise PeerRefused(response.error, response.kind)
                return response.body
            raise PeerUnreachable(f"no answer to {kind} after {attempts} attempts")
        finally:
            del self._waiting[request_id]

    def _usable(self, every_path: bool) -> bool:
        """Whether a request can go out now: a session, and a path up unless it goes over all."""
        return self._session is not None and (every_path or bool(self._up_paths()))

    async def _usable_within(self, every_path: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._usable(every_path):
            if time.monotonic() >= deadline:
                return False
            # Paths come up as the peer's messages arrive, between the loop's ticks.
            await asyncio.sleep(RECONNECT_POLL)
        return True

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self._tick(time.monotonic())
            except Exception:
                # A bug in one round must not end the pings and handshakes of every later one.
                log.exception("peer link: a round of pings and handshakes failed")
            await asyncio.sleep(TICK)

    def _tick(self, now: float) -> None:
        self._expire(now)
        self._update(now)
        if self._session is not None:
            for index in range(len(self._paths)):
                counter = self._send(index, MessageType.PING, protocol.Ping())
                self._pings[counter] = (index, now)
        if not self._connected:
            self._initiate(now)

    def _expire(self, now: float) -> None:
        for table in (self._initiations, self._answered):
            for key in [key for key, entry in table.items() if now - entry.started > HANDSHAKE_TIMEOUT]:
                del table[key]
        for counter in [c for c, (_, sent) in self._pings.items() if now - sent > DEAD_AFTER]:
            del self._pings[counter]

    def _update(self, now: float) -> None:
        connected = self._session is not None and bool(self._up_paths(now))
        if connected != self._connected:
            self._connected = connected
            log.info("peer link %s", "connected" if connected else "disconnected")
        session = self._session.id if self._session else None
        view = (connected, tuple(self._up_paths(now)), session, self.peer_node)
        if view != self._announced:
            self._announced = view
            self._on_change()

    def _up_paths(self, now: float | None = None) -> list[int]:
        moment = time.monotonic() if now is None else now
        return [index for index, path in enumerate(self._paths) if path.up(moment)]

    def _initiate(self, now: float) -> None:
        session = secrets.randbits(64)
        nonce = secrets.token_bytes(protocol.NONCE_SIZE)
        _bounded_put(self._initiations, session, _Initiation(nonce, now))
        hello = protocol.Hello(nonce, self.node_id, self.peer_node)
        self._send_handshake(next(self._hello_turn) % len(self._paths), MessageType.HELLO, session, hello)

    # -- sending -----------------------------------------------------------------------

    def _send(self, index: int, message_type: MessageType, message: Any) -> int:
        assert self._session is not None
        counter, datagram = self._session.seal(message_type, message)
        self._transmit(index, datagram)
        return counter

    def _send_handshake(self, index: int, message_type: MessageType, session: int, message: Any) -> None:
        header = Header(message_type, self._tag, session, 0, time.time_ns())
        self._transmit(index, protocol.seal(self._handshake_key, header, message))

    def _transmit(self, index: int, datagram: bytes) -> None:
        path = self._paths[index]
        path.transport.sendto(datagram, (path.address, self.record.port))

    # -- receiving ---------------------------------------------------------------------

    def received(self, datagram: bytes, source: str) -> None:
        """Act on one datagram, or count and log why it was dropped."""
        try:
            self._receive(datagram, source)
        except Drop as drop:
            self._count(drop, source)
        except Exception:
            # Raised into asyncio, it would close the socket and with it the link.
            log.exception("peer link: a datagram from %s could not be handled", source)

    def _receive(self, datagram: bytes, source: str) -> None:
        index = self._by_address.get(_canonical(source))
        if index is None:
            raise Drop(Reason.UNKNOWN_PEER, "not from an address of the peer")
        header = protocol.read_header(datagram)
        if header.sender == self._tag or (self.peer_node and header.sender != protocol.node_tag(self.peer_node)):
            raise Drop(Reason.UNKNOWN_PEER, "from a node that is not this node's pair")
        if header.type in protocol.HANDSHAKE_TYPES:
            protocol.verify(self._handshake_key, datagram)
            message = protocol.payload(header, datagram)
            if protocol.node_tag(message.node) != header.sender or message.peer not in ("", self.node_id):
                raise Drop(Reason.UNKNOWN_PEER, "from a node paired to another node")
            if header.type is MessageType.HELLO:
                self._hello(index, header, message)
            else:
                self._welcome(index, header, message)
            return
        session = self._session_of(header)
        message = session.open(header, datagram)
        if session is not self._session:
            self._activate(session, self._answered.pop(header.session).peer_node)
        self._arrived(index, header, message)

    def _session_of(self, header: Header) -> Session:
        if self._session is not None and header.session == self._session.id:
            return self._session
        answered = self._answered.get(header.session)
        if answered is None:
            raise Drop(Reason.STALE_SESSION, "a session this daemon does not hold")
        return answered.session

    def _hello(self, index: int, header: Header, hello: protocol.Hello) -> None:
        if hello.nonce in self._seen_hellos:
            raise Drop(Reason.REPLAYED, "a HELLO answered before")
        now = time.monotonic()
        if self._initiations and self._tag < header.sender:
            # Both sides started a handshake: the lower tag's own one goes on.
            return
        _bounded_put(self._seen_hellos, hello.nonce, None, SEEN_HELLOS)
        self._initiations.clear()
        nonce = secrets.token_bytes(protocol.NONCE_SIZE)
        keys = protocol.session_keys(self.record.key, header.sender, self._tag, hello.nonce, nonce, header.session)
        session = Session(header.session, self._tag, header.sender, keys, initiator=False)
        _bounded_put(self._answered, header.session, _Answered(session, hello.node, now))
        welcome = protocol.Welcome(hello.nonce, nonce, self.node_id, self.peer_node)
        self._send_handshake(index, MessageType.WELCOME, header.session, welcome)

    def _welcome(self, index: int, header: Header, welcome: protocol.Welcome) -> None:
        initiation = self._initiations.pop(header.session, None)
        if initiation is None or initiation.nonce != welcome.initiator_nonce:
            raise Drop(Reason.REPLAYED, "a WELCOME that answers no HELLO of ours")
        keys = protocol.session_keys(
            self.record.key, self._tag, header.sender, initiation.nonce, welcome.nonce, header.session
        )
        self._activate(Session(header.session, self._tag, header.sender, keys, initiator=True), welcome.node)
        self._arrived(index, header, welcome)
        # The first message of the session completes the handshake on the other side.
        for path in self._up_paths() or [index]:
            self._send(path, MessageType.PING, protocol.Ping())

    def _activate(self, session: Session, peer_node: str) -> None:
        self._session = session
        self._session_started = time.time()
        self._initiations.clear()
        self._answered.clear()
        self._pings.clear()
        log.info("peer link: new session with node %s", peer_node)
        if not self.peer_node:
            self.peer_node = peer_node
            self._on_peer_identified(peer_node)

    def _arrived(self, index: int, header: Header, message: Any) -> None:
        path = self._paths[index]
        path.last_seen = time.monotonic()
        path.last_received = time.time()
        self._last_message = (path.last_received, header.type.name.lower())
        if isinstance(message, protocol.Ping):
            pong = protocol.Pong(header.counter, header.timestamp, time.time_ns())
            self._send(index, MessageType.PONG, pong)
        elif isinstance(message, protocol.Pong):
            self._measure(header, message)
        elif isinstance(message, protocol.Request):
            self._answer(index, message)
        elif isinstance(message, protocol.Response):
            waiting = self._waiting.get(message.id)
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
        self._update(time.monotonic())

    def _measure(self, header: Header, pong: protocol.Pong) -> None:
        ping = self._pings.pop(pong.ping_counter, None)
        if ping is None:
            return
        index, sent = ping
        arrived = time.time_ns()
        path = self._paths[index]
        # NTP: the peer's time spent between receiving and answering is not network time.
        path.rtt = max(0.0, time.monotonic() - sent - (header.timestamp - pong.received) / 1e9)
        path.offset = ((pong.received - pong.ping_sent) + (header.timestamp - arrived)) / 2e9

    def _answer(self, index: int, request: protocol.Request) -> None:
        task = self._responses.get(request.id)
        if task is None:
            task = asyncio.ensure_future(self._run_handler(request))
            _bounded_put(self._responses, request.id, task, ANSWERED_REQUESTS)
        # A retry is answered over the path it came by, once the handler is done.
        task.add_done_callback(lambda done: self._reply(index, done))

    def _reply(self, index: int, done: asyncio.Task[protocol.Response]) -> None:
        if self._session is None or done.cancelled():
            return
        response = done.result()
        try:
            self._send(index, MessageType.RESPONSE, response)
        except ValueError:
            # Better than a timeout on the asking side: its caller must ask for parts.
            log.error("peer-link answer %d does not fit in one datagram", response.id)
            self._send(index, MessageType.RESPONSE, protocol.Response(response.id, error="the answer is too large"))

    async def _run_handler(self, request: protocol.Request) -> protocol.Response:
        handler = self._handlers.get(request.kind)
        if handler is None:
            return protocol.Response(request.id, error=f"no handler for {request.kind!r} on the peer")
        try:
            return protocol.Response(request.id, body=await handler(request.body))
        except ApplianceError as exc:
            # A refusal the asking node reports as its own (the disk is busy there, ...).
            kind = next((cls.__name__ for cls in type(exc).__mro__ if cls in ALL_ERRORS), "")
            return protocol.Response(request.id, error=str(exc), kind=kind)
        except Exception:
            log.exception("peer-link request %r failed", request.kind)
            return protocol.Response(request.id, error=f"{request.kind} failed on the peer; see its log")

    def _count(self, drop: Drop, source: str) -> None:
        self.drops[drop.reason.value] += 1
        now = time.monotonic()
        if now - self._last_logged.get(drop.reason, -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[drop.reason] = now
            # A stale session follows every restart of either daemon: not a warning.
            level = logging.INFO if drop.reason is Reason.STALE_SESSION else logging.WARNING
            log.log(
                level,
                "peer link dropped a datagram from %s: %s (%s); %d such drops so far",
                source,
                drop.reason.value,
                drop,
                self.drops[drop.reason.value],
            )


def _bounded_put(table: dict[Any, Any], key: Any, value: Any, limit: int = MAX_PENDING) -> None:
    """Insert, then forget the oldest entries beyond ``limit`` (dicts keep insertion order)."""
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]


def _canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.partition("%")[0]))
    except ValueError:
        return address


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _sockets(record: PairRecord) -> list[socket.socket]:
    """Bound UDP sockets: one per local address given, else one wildcard per IP family needed."""
    addresses = record.local_addresses or tuple(
        dict.fromkeys("::" if _family(peer) == socket.AF_INET6 else "0.0.0.0" for peer in record.peer_addresses)
    )
    sockets = []
    try:
        for address in addresses:
            family = _family(address)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            if family == socket.AF_INET6:
                # Beside a 0.0.0.0 socket on the same port: IPv6 only.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, record.port))
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
