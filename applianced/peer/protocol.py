"""Wire format of the peer link: framing, authentication, session keys and the replay window.

A datagram is a fixed header, a MessagePack payload and an HMAC-SHA256 tag over both::

    magic "APLK" | version 1 | type 1 | sender node tag 16 | session 8 | counter 8 | time 8
    payload (MessagePack, one of the dataclasses below by type) | tag 32

All integers are big-endian. The node tag is the first 16 bytes of SHA-256 of the node
id (any string a state file may hold fits), the session is a random 64-bit number the
initiator of the handshake picked, the counter strictly increases per session and
direction, and the time is the sender's wall clock in nanoseconds (the clock offset
between the nodes is estimated from it).

Handshake messages (HELLO, WELCOME) carry counter 0 and are authenticated with a key
derived from the shared key alone; everything else is authenticated with per-session keys
that HKDF (RFC 5869) derives from the shared key, both handshake nonces, both node tags
and the session, one key per direction. A message recorded in one session therefore
never verifies in another, and a message reflected back to its sender never verifies
either. Within a session a 64-message sliding window (as IPsec's) accepts datagrams that
two paths deliver out of order and drops every duplicate.

The framing is checked first, then the tag, then the counter; nothing is decoded before
its tag is verified, and every refusal is a ``Drop`` with a reason the link counts.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import itertools
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from applianced import decoding
from applianced.errors import InvalidArgument

MAGIC = b"APLK"
VERSION = 1
HEADER = struct.Struct("!4sBB16sQQQ")
TAG_SIZE = hashlib.sha256().digest_size
NONCE_SIZE = 32
# A nonce of any other length is refused when the payload is decoded.
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]
# Below the 64 KiB UDP limit with room for IPv6 extension headers; larger payloads (the
# replication bitmaps) are sent as several requests, each naming its offset.
MAX_DATAGRAM = 60_000
MAX_PAYLOAD = MAX_DATAGRAM - HEADER.size - TAG_SIZE
# Counters of a session at most this far behind the highest one seen are still accepted
# once: enough for two paths of different latency, small enough to fit one integer.
REPLAY_WINDOW = 64

# Labels of the key derivation: a new protocol version changes them, so no key is shared
# between versions.
_SALT = b"applianced peer-link v1"
_HANDSHAKE_INFO = b"handshake"
_SESSION_INFO = b"session"


class MessageType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    PING = 3
    PONG = 4
    REQUEST = 5
    RESPONSE = 6


HANDSHAKE_TYPES = (MessageType.HELLO, MessageType.WELCOME)


class Reason(enum.StrEnum):
    """Why a datagram was dropped; the link counts drops by these names."""

    FORGED = "forged"  # the tag does not verify: wrong key, altered or made up
    REPLAYED = "replayed"  # verified, but seen before (or answers no question we asked)
    MALFORMED = "malformed"  # not our framing, or a payload of the wrong shape
    UNKNOWN_PEER = "unknown-peer"  # from an address, or a node, that is not our pair
    STALE_SESSION = "stale-session"  # a session this daemon does not hold (earlier run, old key)


class Drop(Exception):
    """A datagram that is not acted on."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Hello:
    """Opens a session: the initiator's fresh nonce, its node id and the node it is paired to."""

    nonce: Nonce
    node: str
    # The node id the sender recorded for its pair ("" before its first handshake): a node
    # paired to someone else is refused by both sides.
    peer: str


@dataclass(frozen=True)
class Welcome:
    """Answers a HELLO: its nonce echoed (so it is fresh) and the responder's own."""

    initiator_nonce: Nonce
    nonce: Nonce
    node: str
    peer: str


@dataclass(frozen=True)
class Ping:
    """Asks for a PONG over the same path: round-trip time and clock offset."""


@dataclass(frozen=True)
class Pong:
    """``ping_counter`` and ``ping_sent`` identify the PING; ``received`` is our clock then (ns)."""

    ping_counter: int
    ping_sent: int
    received: int


@dataclass(frozen=True)
class Request:
    """A question for a handler of ``kind``; ``id`` is the same on every retry."""

    id: int
    kind: str
    body: bytes


@dataclass(frozen=True)
class Response:
    """The answer to request ``id``: a body, or an error sentence (``kind``: the name of
    the engine error the handler raised, "" for any other failure)."""

    id: int
    body: bytes = b""
    error: str = ""
    kind: str = ""


PAYLOADS: dict[MessageType, type[Any]] = {
    MessageType.HELLO: Hello,
    MessageType.WELCOME: Welcome,
    MessageType.PING: Ping,
    MessageType.PONG: Pong,
    MessageType.REQUEST: Request,
    MessageType.RESPONSE: Response,
}


@dataclass(frozen=True)
class Header:
    type: MessageType
    sender: bytes
    session: int
    counter: int
    timestamp: int


def node_tag(node_id: str) -> bytes:
    """The 16 bytes that name a node in every header."""
    return hashlib.sha256(node_id.encode()).digest()[:16]


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) for one 32-byte output block."""
    pseudo_random_key = hmac.new(salt, secret, hashlib.sha256).digest()
    return hmac.new(pseudo_random_key, info + b"\x01", hashlib.sha256).digest()


def derived_key(shared_key: bytes, purpose: bytes) -> bytes:
    """A key of the pair for ``purpose`` (e.g. encrypting the secrets that cross the link)."""
    return _hkdf(shared_key, _SALT, b"applianced peer link " + purpose)


def handshake_key(shared_key: bytes) -> bytes:
    """The key of HELLO and WELCOME: proves that the sender holds the shared key."""
    return _hkdf(shared_key, _SALT, _HANDSHAKE_INFO)


def session_keys(
    shared_key: bytes, initiator: bytes, responder: bytes, initiator_nonce: bytes, responder_nonce: bytes, session: int
) -> tuple[bytes, bytes]:
    """(initiator → responder key, responder → initiator key) of one session."""
    base = _SALT + initiator_nonce + responder_nonce
    context = _SESSION_INFO + initiator + responder + session.to_bytes(8, "big")
    return _hkdf(shared_key, base, context + b" i2r"), _hkdf(shared_key, base, context + b" r2i")


def seal(key: bytes, header: Header, payload: Any) -> bytes:
    """The datagram of ``payload`` under ``header``, tagged with ``key``."""
    body = msgspec.msgpack.encode(payload)
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"a peer-link payload of {len(body)} bytes exceeds {MAX_PAYLOAD}; send it in parts")
    head = HEADER.pack(MAGIC, VERSION, header.type, header.sender, header.session, header.counter, header.timestamp)
    return head + body + hmac.new(key, head + body, hashlib.sha256).digest()


def read_header(datagram: bytes) -> Header:
    """The header of ``datagram`` (not yet authenticated), or Drop(MALFORMED)."""
    if not HEADER.size + TAG_SIZE <= len(datagram) <= MAX_DATAGRAM:
        raise Drop(Reason.MALFORMED, f"datagram of {len(datagram)} bytes")
    magic, version, kind, sender, session, counter, timestamp = HEADER.unpack_from(datagram)
    if magic != MAGIC or version != VERSION:
        raise Drop(Reason.MALFORMED, "not a peer-link datagram of this version")
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise Drop(Reason.MALFORMED, f"unknown message type {kind}") from None
    if (counter == 0) != (message_type in HANDSHAKE_TYPES):
        raise Drop(Reason.MALFORMED, "counter 0 is for handshake messages only")
    return Header(message_type, sender, session, counter, timestamp)


def verify(key: bytes, datagram: bytes) -> None:
    """Drop(FORGED) unless the tag at the end of ``datagram`` is ``key``'s over the rest."""
    expected = hmac.new(key, datagram[:-TAG_SIZE], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, datagram[-TAG_SIZE:]):
        raise Drop(Reason.FORGED, "authentication tag does not verify")


def payload(header: Header, datagram: bytes) -> Any:
    """The typed payload of an authenticated datagram, or Drop(MALFORMED)."""
    try:
        return decoding.unpack(datagram[HEADER.size : -TAG_SIZE], PAYLOADS[header.type], header.type.name)
    except InvalidArgument as exc:
        raise Drop(Reason.MALFORMED, str(exc)) from None


class ReplayWindow:
    """Accepts each counter once, also out of order within ``REPLAY_WINDOW`` of the highest."""

    def __init__(self) -> None:
        self.highest = 0
        # Bit i set: counter ``highest - i`` was accepted.
        self._seen = 0

    def check(self, counter: int) -> None:
        """Drop(REPLAYED) if ``counter`` was accepted before or is too old to tell."""
        if counter > self.highest:
            return
        age = self.highest - counter
        if age >= REPLAY_WINDOW or self._seen >> age & 1:
            raise Drop(Reason.REPLAYED, f"counter {counter} seen before (highest {self.highest})")

    def accept(self, counter: int) -> None:
        """Record ``counter``; call only after its datagram was authenticated and checked."""
        if counter > self.highest:
            self._seen = (self._seen << (counter - self.highest) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
        else:
            self._seen |= 1 << (self.highest - counter)


class Session:
    """One authenticated session with the peer: its keys, our counter and its window."""

    def __init__(self, session: int, own: bytes, peer: bytes, keys: tuple[bytes, bytes], initiator: bool) -> None:
        self.id = session
        self.own = own
        self.peer = peer
        self._send_key, self._receive_key = keys if initiator else keys[::-1]
        self._counter = itertools.count(1)
        self.window = ReplayWindow()

    def seal(self, message_type: MessageType, message: Any, clock: Any = time.time_ns) -> tuple[int, bytes]:
        """(counter, datagram) of a message of this session."""
        counter = next(self._counter)
        header = Header(message_type, self.own, self.id, counter, clock())
        return counter, seal(self._send_key, header, message)

    def open(self, header: Header, datagram: bytes) -> Any:
        """The payload of a datagram of this session, or Drop (forged, replayed, malformed)."""
        if header.sender != self.peer:
            raise Drop(Reason.UNKNOWN_PEER, "session message from another node")
        # The tag first: an unauthenticated datagram is forged whatever counter it claims.
        verify(self._receive_key, datagram)
        self.window.check(header.counter)
        self.window.accept(header.counter)
        return payload(header, datagram)
