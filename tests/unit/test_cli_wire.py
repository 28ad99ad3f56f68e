"""The CLI's D-Bus wire format: round trips, padding, limits, and agreement with dbus-fast.

dbus-fast (which the daemon uses) is the independent witness: a message the CLI builds
must be byte for byte the one dbus-fast builds, and the CLI must read what dbus-fast writes.
"""

import struct

import dbus_fast
import pytest

from applianced.cli import wire
from applianced.cli.wire import Variant, WireError, marshal, unmarshal, unpack_variants

EXTREMES = [
    ("y", [0, 255]),
    ("b", [False, True]),
    ("n", [-(2**15), 0, 2**15 - 1]),
    ("q", [0, 2**16 - 1]),
    ("i", [-(2**31), -1, 2**31 - 1]),
    ("u", [0, 2**32 - 1]),
    ("x", [-(2**63), 2**63 - 1]),
    ("t", [0, 2**64 - 1]),
    ("d", [0.0, -1.5, 1e308, float("inf")]),
    ("s", ["", "ünïcode ✓", "x" * 1000]),
    ("o", ["/", "/org/applianced/Appliance1/targets/t_2e1"]),
    ("g", ["", "a{sv}", "a(ssbdd)aa{sv}"]),
]

# What the CLI sends and receives, in the types of applianced's API (dbus/*.xml).
API_VALUES = [
    ("a{sv}", [{"path": Variant("s", "/srv/a.img"), "write_back": Variant("b", True), "lun": Variant("u", 3)}]),
    ("sta{sv}", ["d1", 2**40, {"description": Variant("s", "mail store")}]),
    ("a{sv}a{sv}", [{"enabled": Variant("b", False)}, {"force": Variant("b", True)}]),
    ("sqa{sv}", ["fd00::5", 3261, {"targets": Variant("ao", ["/org/applianced/Appliance1/targets/t1"])}]),
    ("saya{sv}", ["10.0.1.2", b"k" * 40, {"port": Variant("q", 7790), "local_addresses": Variant("as", ["a", "b"])}]),
    ("asa{sv}", [["10.0.0.0/24", "app1.example.com"], {}]),
    ("a{ss}", [{"HeaderDigest": "CRC32C", "DataDigest": "None"}]),
    ("a{st}", [{"forged": 3, "replayed": 2**63}]),
    ("aa{sv}", [[{"Initiator": Variant("s", "iqn.x"), "Luns": Variant("au", [0, 7])}, {}]]),
    ("a(ssbdd)", [[["10.0.1.2", "main", True, 0.0005, 2.5], ["10.0.2.2", "aux", False, -1.0, 0.0]]]),
    ("a(sqs)", [[["192.0.2.1", 51234, "10.0.0.5:3260"]]]),
    ("ao", [["/", "/org/a"]]),
    ("ay", [bytes(range(256))]),
    ("a{oa{sa{sv}}}", [{"/org/a": {"org.x.I": {"Name": Variant("s", "a"), "Size": Variant("t", 1)}}}]),
    ("v", [Variant("a{sv}", {"inner": Variant("v", Variant("(yt)", [1, 2]))})]),
]

# Each starts a value one byte in, so that every alignment (2, 4, 8, and 8 for an empty
# array's elements) needs padding.
ODD_ALIGNMENTS = [
    ("yn", [1, -2]),
    ("yq", [1, 2]),
    ("yb", [1, True]),
    ("yi", [1, -3]),
    ("yu", [1, 4]),
    ("yx", [1, -5]),
    ("yt", [1, 6]),
    ("yd", [1, 7.5]),
    ("ys", [1, "s"]),
    ("yo", [1, "/o"]),
    ("yg", [1, "g"]),
    ("yv", [1, Variant("t", 8)]),
    ("y(yt)", [1, [2, 3]]),
    ("ya{sv}", [1, {"k": Variant("d", 1.0)}]),
    ("ya{sv}", [1, {}]),
    ("yat", [1, []]),
    ("ya(y)", [1, []]),
    ("yay", [1, b""]),
    ("yaay", [1, [b"", b"a", b""]]),
    ("yaat", [1, [[], [9], []]]),
    ("yaaa{sv}", [1, [[], [{}], [{"a": Variant("as", [])}]]]),
    ("yyyyyyyyv", [1, 2, 3, 4, 5, 6, 7, 8, Variant("y", 9)]),
]


def round_trip(signature, values):
    data = marshal(signature, values)
    decoded, end = unmarshal(signature, data)
    assert end == len(data)
    return decoded


def as_dbus_fast(value):
    """The same value with dbus-fast's variants, to let dbus-fast marshal it."""
    if isinstance(value, Variant):
        return dbus_fast.Variant(value.signature, as_dbus_fast(value.value))
    if isinstance(value, dict):
        return {key: as_dbus_fast(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_dbus_fast(item) for item in value]
    return value


def from_dbus_fast(value):
    if isinstance(value, dbus_fast.Variant):
        return Variant(value.signature, from_dbus_fast(value.value))
    if isinstance(value, dict):
        return {key: from_dbus_fast(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_dbus_fast(item) for item in value]
    return value


def dbus_fast_bytes(**message):
    """A message as dbus-fast puts it on the wire (its only way to it is the private _marshall)."""
    return bytes(dbus_fast.Message(**message)._marshall(False))


@pytest.mark.parametrize(("code", "values"), EXTREMES)
def test_every_basic_type_round_trips_at_its_limits(code, values):
    for value in values:
        assert round_trip(code, [value]) == [value]
        assert round_trip(code * 3, [value] * 3) == [value] * 3
    assert type(round_trip("b", [True])[0]) is bool


@pytest.mark.parametrize(("signature", "values"), API_VALUES + ODD_ALIGNMENTS)
def test_api_values_and_odd_alignments_round_trip(signature, values):
    assert round_trip(signature, values) == values


@pytest.mark.parametrize(("signature", "values"), API_VALUES + ODD_ALIGNMENTS + EXTREMES)
def test_a_method_call_is_byte_for_byte_what_dbus_fast_sends(signature, values):
    if len(wire.split_signature(signature)) != len(values):  # EXTREMES: one value per call
        values = values[:1]
        signature = signature[:1]
    ours = wire.method_call(7, "org.example.Dest", "/org/example", "org.example.I", "Do", signature, values)
    theirs = dbus_fast_bytes(
        destination="org.example.Dest",
        path="/org/example",
        interface="org.example.I",
        member="Do",
        signature=signature,
        body=as_dbus_fast(values),
        serial=7,
    )
    assert ours == theirs


@pytest.mark.parametrize(("signature", "values"), API_VALUES + ODD_ALIGNMENTS)
def test_replies_written_by_dbus_fast_are_read_back(signature, values):
    reply = dbus_fast_bytes(
        message_type=dbus_fast.MessageType.METHOD_RETURN,
        reply_serial=41,
        serial=9,
        signature=signature,
        body=as_dbus_fast(values),
    )
    assert wire.message_length(reply[: wire.PREFIX_LENGTH]) == len(reply)
    message = wire.parse_message(reply)
    assert (message.type, message.serial, message.reply_serial, message.error_name) == (wire.METHOD_RETURN, 9, 41, None)
    assert message.body == values
    assert from_dbus_fast(as_dbus_fast(values)) == values


def test_an_error_reply_carries_its_name_and_text():
    error = dbus_fast_bytes(
        message_type=dbus_fast.MessageType.ERROR,
        error_name="org.applianced.Appliance1.Error.NotFound",
        reply_serial=5,
        serial=6,
        signature="s",
        body=["disk 'x' does not exist"],
    )
    message = wire.parse_message(error)
    assert (message.type, message.reply_serial) == (wire.ERROR, 5)
    assert message.error_name == "org.applianced.Appliance1.Error.NotFound"
    assert message.body == ["disk 'x' does not exist"]


def test_padding_follows_the_specification():
    # A byte, three bytes of padding, then the u32.
    assert marshal("yu", [1, 2]) == b"\x01\0\0\0\x02\0\0\0"
    # An empty array of 8-aligned elements still pads from its length to its first element.
    assert marshal("yat", [1, []]) == b"\x01\0\0\0" + b"\0\0\0\0"
    assert marshal("at", [[]]) == b"\0\0\0\0" + b"\0\0\0\0"
    assert marshal("ayy", [b"", 5]) == b"\0\0\0\0\x05"
    # a{sv}: length 16 (8 bytes into the body), then "a" (length, byte, NUL), then the
    # variant's signature "u", then padding to 4 and the value.
    assert marshal("a{sv}", [{"a": Variant("u", 7)}]) == (
        struct.pack("<I", 16)
        + b"\0" * 4
        + struct.pack("<I", 1)
        + b"a\0"
        + b"\x01u\0"
        + b"\0" * 3
        + struct.pack("<I", 7)
    )


def test_structs_come_back_as_lists_and_tuples_go_in_as_structs():
    assert round_trip("(sq)a(sq)", [("a", 1), [("b", 2)]]) == [["a", 1], [["b", 2]]]


def test_a_message_larger_than_64_kib_round_trips():
    big = {
        f"/org/applianced/Appliance1/targets/t{i}": {
            "org.applianced.Appliance1.Target": {
                "Name": Variant("s", f"t{i}"),
                "Description": Variant("s", "d" * 200),
                "AllowedSources": Variant("as", ["10.0.0.0/24"] * 5),
                "Sessions": Variant("aa{sv}", [{"Luns": Variant("au", [0, 1, 2])}]),
            }
        }
        for i in range(400)
    }
    reply = dbus_fast_bytes(
        message_type=dbus_fast.MessageType.METHOD_RETURN,
        reply_serial=3,
        serial=4,
        signature="a{oa{sa{sv}}}s",
        body=[as_dbus_fast(big), "é" * 70_000],
    )
    assert len(reply) > 200 * 1024
    message = wire.parse_message(reply)
    assert message.body == [big, "é" * 70_000]
    call = wire.method_call(2, "a.b", "/", "a.b", "M", "a{oa{sa{sv}}}", [big])
    assert wire.message_length(call[:16]) == len(call)
    assert wire.parse_message(call).body == [big]


def test_a_big_endian_message_is_read_too():
    body = struct.pack(">I", 2) + b"hi\0" + b"\0" + struct.pack(">I", 7)
    fields = (
        bytes([wire.REPLY_SERIAL, 1])
        + b"u\0"
        + struct.pack(">I", 12)
        + bytes([wire.SIGNATURE, 1])
        + b"g\0"
        + b"\x02su\0"
    )
    header = b"B" + bytes([wire.METHOD_RETURN, 0, 1]) + struct.pack(">III", len(body), 99, len(fields)) + fields
    message = header + b"\0" * (-len(header) % 8) + body
    assert wire.message_length(message[:16]) == len(message)
    parsed = wire.parse_message(message)
    assert (parsed.serial, parsed.reply_serial, parsed.body) == (99, 12, ["hi", 7])


def test_unpack_variants_leaves_plain_values_at_any_depth():
    value = {"a": Variant("aa{sv}", [{"b": Variant("(sv)", ["c", Variant("t", 1)])}]), "d": [Variant("s", "e")]}
    assert unpack_variants(value) == {"a": [{"b": ["c", 1]}], "d": ["e"]}
    assert unpack_variants(value) == dbus_fast.unpack_variants(as_dbus_fast(value))


@pytest.mark.parametrize(
    ("signature", "value"),
    [
        ("y", 256),
        ("y", -1),
        ("n", 2**15),
        ("q", -1),
        ("q", 65536),
        ("i", 2**31),
        ("u", 2**32),
        ("u", -1),
        ("x", 2**63),
        ("t", 2**64),
        ("t", 1.0),
        ("b", 1),
        ("d", "1"),
        ("s", b"bytes"),
        ("s", "nul\0inside"),
        ("s", "\udcff"),  # a lone surrogate (undecodable bytes in argv) has no UTF-8
        ("o", ""),
        ("o", "no/slash"),
        ("o", "/trailing/"),
        ("o", "/double//slash"),
        ("o", "/dash-ed"),
        ("g", "a"),
        ("ay", "text"),
        ("as", "not a list"),
        ("a{sv}", {"k": "not a variant"}),
        ("a{sv}", [("k", Variant("s", "v"))]),
        ("(su)", ["only one"]),
        ("(su)", "su"),
    ],
)
def test_values_the_wire_cannot_carry_are_refused_when_built(signature, value):
    with pytest.raises(ValueError):
        marshal(signature, [value])
    with pytest.raises(ValueError):
        Variant(signature, value)


@pytest.mark.parametrize(
    "signature", ["a", "(", "()", "(s", "s)", "{sv}", "a{vs}", "a{s}", "a{sss}", "a{(s)s}", "h", "z", "a" * 33 + "y"]
)
def test_invalid_signatures_are_refused(signature):
    with pytest.raises(WireError):
        wire.split_signature(signature)


def test_signatures_split_into_complete_types():
    assert wire.split_signature("sa{sv}a(ssbdd)vaay") == ["s", "a{sv}", "a(ssbdd)", "v", "aay"]
    assert wire.split_signature("a" * 32 + "y") == ["a" * 32 + "y"]
    with pytest.raises(WireError):
        Variant("ss", ["a", "b"])
    with pytest.raises(WireError):
        marshal("ss", ["only one"])


def test_malformed_messages_are_refused():
    good = wire.method_call(1, "a.b", "/", "a.b", "M", "s", ["text"])
    for broken in (good[:-1], good + b"\0" * 8, b"X" + good[1:], good[:3] + b"\2" + good[4:]):
        with pytest.raises(WireError):
            wire.parse_message(broken)
    # A boolean is 0 or 1 on the wire, nothing else.
    with pytest.raises(WireError):
        unmarshal("b", struct.pack("<I", 2))
    # A string ends with a NUL, where its length says.
    with pytest.raises(WireError):
        unmarshal("s", struct.pack("<I", 2) + b"hiX")
    # A string whose length runs past the end of the message.
    lying = good[: -len("text") - 5] + struct.pack("<I", 1000) + good[-len("text") - 1 :]
    with pytest.raises(WireError):
        wire.parse_message(lying)
