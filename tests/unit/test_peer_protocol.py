"""The peer link's wire format: tags, session keys, replay window, hostile datagrams."""

import random

import pytest

from applianced.peer import protocol
from applianced.peer.protocol import Drop, Header, MessageType, Reason, ReplayWindow, Session

KEY = b"k" * 32
A, B = protocol.node_tag("node-a"), protocol.node_tag("node-b")
NONCE_A, NONCE_B = b"a" * 32, b"b" * 32


def session_pair(key=KEY, nonce_b=NONCE_B, session=7):
    keys = protocol.session_keys(key, A, B, NONCE_A, nonce_b, session)
    return Session(session, A, B, keys, initiator=True), Session(session, B, A, keys, initiator=False)


def receive(session, datagram):
    return session.open(protocol.read_header(datagram), datagram)


def test_a_message_crosses_and_is_typed():
    initiator, responder = session_pair()
    _, datagram = initiator.seal(MessageType.REQUEST, protocol.Request(5, "volume-setup", b"\x00\x01"))
    assert receive(responder, datagram) == protocol.Request(5, "volume-setup", b"\x00\x01")
    _, answer = responder.seal(MessageType.RESPONSE, protocol.Response(5, body=b"ok"))
    assert receive(initiator, answer) == protocol.Response(5, body=b"ok")


def expected_reason(index):
    """Magic and version are framing (REQUEST's type flips to PONG, also a session type);
    the sender's tag is checked before the MAC; the MAC covers everything else."""
    if index < 5:
        return Reason.MALFORMED
    if 6 <= index < 6 + 16:
        return Reason.UNKNOWN_PEER
    return Reason.FORGED


def test_every_tampered_byte_is_dropped_and_the_rest_are_forged():
    initiator, _ = session_pair()
    initiator.seal(MessageType.PING, protocol.Ping())
    # Counter 2: flipping its lowest bit gives 3, not the handshake's 0.
    _, datagram = initiator.seal(MessageType.REQUEST, protocol.Request(1, "state", b"payload"))
    for index in range(len(datagram)):
        altered = bytearray(datagram)
        altered[index] ^= 0x01
        _, fresh = session_pair()
        assert reason_of(fresh, bytes(altered)) is expected_reason(index), index
    # The untouched datagram is accepted, so each refusal above came from its one changed bit.
    _, fresh = session_pair()
    assert receive(fresh, datagram) == protocol.Request(1, "state", b"payload")


def ping(session):
    return session.seal(MessageType.PING, protocol.Ping())[1]


def reason_of(session, datagram):
    """Why ``session`` drops ``datagram`` (it must drop it)."""
    with pytest.raises(Drop) as dropped:
        receive(session, datagram)
    return dropped.value.reason


def test_a_wrong_key_is_forged():
    initiator, _ = session_pair()
    _, other = session_pair(key=b"x" * 32)
    assert reason_of(other, ping(initiator)) is Reason.FORGED


def test_a_replay_within_the_session_is_dropped():
    initiator, responder = session_pair()
    datagram = ping(initiator)
    receive(responder, datagram)
    assert reason_of(responder, datagram) is Reason.REPLAYED


def test_a_message_of_an_earlier_session_never_verifies_in_a_later_one():
    old_initiator, _ = session_pair(nonce_b=b"1" * 32)
    _, new_responder = session_pair(nonce_b=b"2" * 32)
    assert reason_of(new_responder, ping(old_initiator)) is Reason.FORGED


def test_a_message_reflected_to_its_sender_is_refused():
    initiator, _ = session_pair()
    assert reason_of(initiator, ping(initiator)) is Reason.UNKNOWN_PEER


def test_reordering_within_the_window_is_accepted_once():
    initiator, responder = session_pair()
    datagrams = [ping(initiator) for _ in range(protocol.REPLAY_WINDOW)]
    shuffled = datagrams[:]
    random.Random(4).shuffle(shuffled)
    for datagram in shuffled:
        receive(responder, datagram)
    for datagram in datagrams:
        assert reason_of(responder, datagram) is Reason.REPLAYED


def test_a_counter_older_than_the_window_is_dropped():
    window = ReplayWindow()
    window.accept(100)
    window.check(100 - protocol.REPLAY_WINDOW + 1)
    with pytest.raises(Drop):
        window.check(100 - protocol.REPLAY_WINDOW)
    window.accept(1000)
    with pytest.raises(Drop):
        window.check(100)
    window.check(999)


@pytest.mark.parametrize(
    "datagram",
    [
        b"",
        b"APLK",
        b"\x00" * 200,
        protocol.MAGIC + b"\x02" + b"\x00" * 200,  # another version
        protocol.MAGIC + b"\x01\x63" + b"\x00" * 200,  # unknown type
        protocol.MAGIC + b"\x01\x03" + b"\x00" * 200,  # a session message with counter 0
        b"\xff" * (protocol.MAX_DATAGRAM + 1),
    ],
)
def test_garbage_is_malformed(datagram):
    _, responder = session_pair()
    assert reason_of(responder, datagram) is Reason.MALFORMED


def test_random_garbage_never_raises_anything_but_drop():
    _, responder = session_pair()
    generator = random.Random(10)
    for _ in range(2000):
        length = generator.choice([0, 10, protocol.HEADER.size + protocol.TAG_SIZE, 100, 1500])
        datagram = bytes(generator.getrandbits(8) for _ in range(length))
        if generator.random() < 0.5 and len(datagram) >= 6:
            datagram = protocol.MAGIC + b"\x01" + bytes([generator.randint(1, 6)]) + datagram[6:]
        with pytest.raises(Drop):
            receive(responder, datagram)


def test_an_authenticated_payload_of_the_wrong_shape_is_malformed():
    header = Header(MessageType.REQUEST, A, 7, 1, 0)
    _, responder = session_pair()
    keys = protocol.session_keys(KEY, A, B, NONCE_A, NONCE_B, 7)
    datagram = protocol.seal(keys[0], header, {"id": "not a number"})
    assert reason_of(responder, datagram) is Reason.MALFORMED


def test_handshake_messages_verify_only_with_the_same_key():
    header = Header(MessageType.HELLO, A, 9, 0, 0)
    datagram = protocol.seal(protocol.handshake_key(KEY), header, protocol.Hello(NONCE_A, "node-a", ""))
    protocol.verify(protocol.handshake_key(KEY), datagram)
    assert protocol.payload(protocol.read_header(datagram), datagram) == protocol.Hello(NONCE_A, "node-a", "")
    with pytest.raises(Drop) as dropped:
        protocol.verify(protocol.handshake_key(b"y" * 32), datagram)
    assert dropped.value.reason is Reason.FORGED


def test_payloads_too_large_for_a_datagram_are_refused():
    initiator, _ = session_pair()
    with pytest.raises(ValueError, match="send it in parts"):
        initiator.seal(MessageType.REQUEST, protocol.Request(1, "bitmap", b"\x00" * protocol.MAX_DATAGRAM))


def test_a_handshake_nonce_of_another_length_is_malformed():
    header = Header(MessageType.HELLO, A, 9, 0, 0)
    datagram = protocol.seal(protocol.handshake_key(KEY), header, protocol.Hello(b"short", "node-a", ""))
    protocol.verify(protocol.handshake_key(KEY), datagram)
    with pytest.raises(Drop) as dropped:
        protocol.payload(protocol.read_header(datagram), datagram)
    assert dropped.value.reason is Reason.MALFORMED
