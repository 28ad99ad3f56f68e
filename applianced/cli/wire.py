"""The D-Bus wire format, as far as appliancectl needs it: signatures, values and messages.

Written from the D-Bus specification (sections "Type System" and "Message Protocol") so
that the CLI need not import dbus-fast, whose package pulls in asyncio, ssl and its
service machinery on every start of the CLI. It marshals every type the CLI sends or
receives: the basic types but ``h`` (the CLI passes no file descriptors), arrays,
dictionaries, structs and variants. Messages it writes are little-endian; messages it
reads may be in either byte order, as the specification allows any sender to choose.

Values are Python's as dbus-fast gives them, so that the CLI's code reads the same: ints,
``bool``, ``float``, ``str``, ``bytes`` for ``ay``, ``dict`` for ``a{..}``, ``list`` for
other arrays and for structs, and :class:`Variant` for ``v``.
"""

from __future__ import annotations

import struct

# typing is for checkers only: importing it costs about as much as this module (see client.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    # A writer appends one value to a bytearray, padding it first to the value's alignment;
    # a reader takes the message and a position and returns the value and the position after
    # it. Alignment counts from the start of the buffer, which is the message's start or, for
    # a body, a multiple of 8 bytes into the message: the same padding either way.
    Writer = Callable[[bytearray, Any], None]
    Reader = Callable[[bytes, int], tuple[Any, int]]

# Message types, and the codes of the header fields the CLI writes or reads (7 is the sender).
METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SIGNATURE = 1, 2, 3, 4, 5, 6, 8

MAX_ARRAY_LENGTH = 2**26
MAX_MESSAGE_LENGTH = 2**27
# The fixed part of a header and the length of its field array: enough to know a message's size.
PREFIX_LENGTH = 16

_INTEGERS = {
    "y": ("B", 0, 2**8 - 1),
    "n": ("h", -(2**15), 2**15 - 1),
    "q": ("H", 0, 2**16 - 1),
    "i": ("i", -(2**31), 2**31 - 1),
    "u": ("I", 0, 2**32 - 1),
    "x": ("q", -(2**63), 2**63 - 1),
    "t": ("Q", 0, 2**64 - 1),
}
_BASIC = "ybnqiuxtdsog"
_ALIGNMENT = {"y": 1, "g": 1, "v": 1, "n": 2, "q": 2, "b": 4, "i": 4, "u": 4, "s": 4, "o": 4, "a": 4}
_MAX_DEPTH = 32
_U32 = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}
_LITTLE_U32 = _U32["<"]
_PATH_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class WireError(ValueError):
    """A signature, a value or a message that the D-Bus wire format does not allow."""


class Variant:
    """A value with its own signature (one complete type): D-Bus type ``v``.

    Like dbus-fast's, it checks the value against the signature when it is made, so that a
    value out of range fails where it is built, not in the middle of a call.
    """

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any) -> None:
        if len(split_signature(signature)) != 1:
            raise WireError(f"a variant needs one complete type, not {signature!r}")
        _writer(signature)(bytearray(), value)
        self.signature = signature
        self.value = value

    @classmethod
    def _received(cls, signature: str, value: Any) -> Variant:
        """A variant read from a message: its value matches its signature by construction."""
        variant = object.__new__(cls)
        variant.signature = signature
        variant.value = value
        return variant

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Variant):
            return NotImplemented
        return self.signature == other.signature and self.value == other.value

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


def unpack_variants(value: Any) -> Any:
    """``value`` with every variant in it, at any depth, replaced by the variant's value."""
    if isinstance(value, Variant):
        return unpack_variants(value.value)
    if isinstance(value, dict):
        return {key: unpack_variants(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unpack_variants(item) for item in value]
    return value


# -- signatures --------------------------------------------------------------------------


def split_signature(signature: str) -> list[str]:
    """The complete types of a signature in order: ``"sa{sv}"`` gives ``["s", "a{sv}"]``."""
    if len(signature) > 255:
        raise WireError(f"signature {signature[:20]!r}... is longer than 255 characters")
    types = []
    position = 0
    while position < len(signature):
        end = _end_of_type(signature, position, 0, 0)
        types.append(signature[position:end])
        position = end
    return types


def _end_of_type(signature: str, position: int, arrays: int, structs: int) -> int:
    """Where the complete type that starts at ``position`` ends; nesting is limited as the
    specification says (32 arrays and 32 structs or dictionary entries deep)."""
    if arrays > _MAX_DEPTH or structs > _MAX_DEPTH:
        raise WireError(f"signature {signature!r} nests too deep")
    code = signature[position : position + 1]
    if code and (code in _BASIC or code == "v"):
        return position + 1
    if code == "a":
        if signature[position + 1 : position + 2] != "{":
            return _end_of_type(signature, position + 1, arrays + 1, structs)
        key = signature[position + 2 : position + 3]
        if not key or key not in _BASIC:
            raise WireError(f"signature {signature!r}: a dictionary's key must be a basic type")
        end = _end_of_type(signature, position + 3, arrays + 1, structs + 1)
        if signature[end : end + 1] != "}":
            raise WireError(f"signature {signature!r}: a dictionary entry holds one key and one value")
        return end + 1
    if code == "(":
        position += 1
        if signature[position : position + 1] == ")":
            raise WireError(f"signature {signature!r} has an empty struct")
        while signature[position : position + 1] != ")":
            if position >= len(signature):
                raise WireError(f"signature {signature!r} has an unclosed struct")
            position = _end_of_type(signature, position, arrays, structs + 1)
        return position + 1
    raise WireError(f"signature {signature!r} is not valid at {signature[position:]!r}")


def _alignment(type_: str) -> int:
    return _ALIGNMENT.get(type_[0], 8)


def _pad(out: bytearray, alignment: int) -> None:
    out += bytes(-len(out) % alignment)


# -- writing -----------------------------------------------------------------------------

_writers: dict[str, Writer] = {}


def _writer(type_: str) -> Writer:
    """The writer of one complete type, made once per type."""
    writer = _writers.get(type_)
    if writer is None:
        writer = _writers[type_] = _make_writer(type_)
    return writer


def _make_writer(type_: str) -> Writer:
    code = type_[0]
    if code in _INTEGERS:
        return _integer_writer(code)
    if code == "b":
        return _write_boolean
    if code == "d":
        return _write_double
    if code == "s":
        return _write_string
    if code == "o":
        return _write_object_path
    if code == "g":
        return _write_signature
    if code == "v":
        return _write_variant
    if code == "(":
        return _struct_writer(split_signature(type_[1:-1]))
    if type_ == "ay":
        return _write_bytes
    if type_.startswith("a{"):
        key, value = split_signature(type_[2:-1])
        return _dict_writer(_writer(key), _writer(value))
    return _list_writer(type_[1:])


def _integer_writer(code: str) -> Writer:
    form, low, high = _INTEGERS[code]
    packer = struct.Struct("<" + form)

    def write(out: bytearray, value: Any) -> None:
        # bool is an int to Python, and to dbus-fast: it is accepted as 0 or 1.
        if not isinstance(value, int) or not low <= value <= high:
            raise WireError(f"D-Bus type {code!r} takes integers from {low} to {high}, not {value!r}")
        _pad(out, packer.size)
        out += packer.pack(value)

    return write


def _write_boolean(out: bytearray, value: Any) -> None:
    if not isinstance(value, bool):
        raise WireError(f"D-Bus type 'b' takes True or False, not {value!r}")
    _pad(out, 4)
    out += _LITTLE_U32.pack(value)


def _write_double(out: bytearray, value: Any) -> None:
    if not isinstance(value, int | float):
        raise WireError(f"D-Bus type 'd' takes a number, not {value!r}")
    _pad(out, 8)
    out += struct.pack("<d", value)


def _write_string(out: bytearray, value: Any) -> None:
    if not isinstance(value, str):
        raise WireError(f"D-Bus type 's' takes a str, not {value!r}")
    encoded = value.encode()
    if b"\0" in encoded:
        raise WireError("a D-Bus string cannot hold a NUL character")
    _pad(out, 4)
    out += _LITTLE_U32.pack(len(encoded))
    out += encoded
    out.append(0)


def _is_object_path(value: str) -> bool:
    """Whether ``value`` is ``/`` or ``/``-separated elements of ASCII letters, digits and ``_``."""
    if value == "/":
        return True
    head, *elements = value.split("/")
    return (
        head == "" and bool(elements) and all(element and _PATH_CHARACTERS.issuperset(element) for element in elements)
    )


def _write_object_path(out: bytearray, value: Any) -> None:
    if not isinstance(value, str) or not _is_object_path(value):
        raise WireError(f"{value!r} is not a D-Bus object path")
    _write_string(out, value)


def _write_signature(out: bytearray, value: Any) -> None:
    if not isinstance(value, str):
        raise WireError(f"D-Bus type 'g' takes a str, not {value!r}")
    split_signature(value)
    out.append(len(value))
    out += value.encode("ascii")
    out.append(0)


def _write_variant(out: bytearray, value: Any) -> None:
    if not isinstance(value, Variant):
        raise WireError(f"D-Bus type 'v' takes a Variant, not {value!r}")
    _write_signature(out, value.signature)
    _writer(value.signature)(out, value.value)


def _struct_writer(members: list[str]) -> Writer:
    writers = [_writer(member) for member in members]

    def write(out: bytearray, value: Any) -> None:
        if not isinstance(value, list | tuple) or len(value) != len(writers):
            raise WireError(f"a struct of {len(writers)} members is a list or tuple of as many, not {value!r}")
        _pad(out, 8)
        for member_writer, member in zip(writers, value, strict=True):
            member_writer(out, member)

    return write


def _array(out: bytearray, alignment: int) -> tuple[int, int]:
    """Start an array: its length field, to be filled in by :func:`_end_array`, and the padding
    to its first element, which the specification requires even when there is none."""
    _pad(out, 4)
    length_at = len(out)
    out += b"\0\0\0\0"
    _pad(out, alignment)
    return length_at, len(out)


def _end_array(out: bytearray, length_at: int, start: int) -> None:
    length = len(out) - start
    if length > MAX_ARRAY_LENGTH:
        raise WireError(f"an array of {length} bytes is longer than D-Bus allows ({MAX_ARRAY_LENGTH})")
    _LITTLE_U32.pack_into(out, length_at, length)


def _write_bytes(out: bytearray, value: Any) -> None:
    if not isinstance(value, bytes | bytearray):
        raise WireError(f"D-Bus type 'ay' takes bytes, not {value!r}")
    length_at, start = _array(out, 1)
    out += value
    _end_array(out, length_at, start)


def _dict_writer(key_writer: Writer, value_writer: Writer) -> Writer:
    def write(out: bytearray, value: Any) -> None:
        if not isinstance(value, dict):
            raise WireError(f"a D-Bus dictionary is a dict, not {value!r}")
        length_at, start = _array(out, 8)
        for key, item in value.items():
            _pad(out, 8)
            key_writer(out, key)
            value_writer(out, item)
        _end_array(out, length_at, start)

    return write


def _list_writer(element: str) -> Writer:
    element_writer = _writer(element)
    alignment = _alignment(element)

    def write(out: bytearray, value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise WireError(f"a D-Bus array of {element!r} is a list or tuple, not {value!r}")
        length_at, start = _array(out, alignment)
        for item in value:
            element_writer(out, item)
        _end_array(out, length_at, start)

    return write


def marshal(signature: str, values: list[Any] | tuple[Any, ...]) -> bytes:
    """A message body: ``values`` in the types of ``signature``, little-endian."""
    types = split_signature(signature)
    if len(values) != len(types):
        raise WireError(f"signature {signature!r} takes {len(types)} values, not {len(values)}")
    out = bytearray()
    for type_, value in zip(types, values, strict=True):
        _writer(type_)(out, value)
    return bytes(out)


# -- reading -----------------------------------------------------------------------------

_readers: dict[tuple[str, str], Reader] = {}


def _reader(type_: str, order: str) -> Reader:
    """The reader of one complete type in one byte order (``<`` or ``>``), made once."""
    reader = _readers.get((type_, order))
    if reader is None:
        reader = _readers[type_, order] = _make_reader(type_, order)
    return reader


def _make_reader(type_: str, order: str) -> Reader:
    code = type_[0]
    if code in _INTEGERS:
        return _fixed_reader(struct.Struct(order + _INTEGERS[code][0]))
    if code == "b":
        return _boolean_reader(order)
    if code == "d":
        return _fixed_reader(struct.Struct(order + "d"))
    if code in "so":
        return _string_reader(order)
    if code == "g":
        return _read_signature
    if code == "v":
        return _variant_reader(order)
    if code == "(":
        return _struct_reader([_reader(member, order) for member in split_signature(type_[1:-1])])
    if type_ == "ay":
        return _bytes_reader(order)
    if type_.startswith("a{"):
        key, value = split_signature(type_[2:-1])
        return _dict_reader(order, _reader(key, order), _reader(value, order))
    return _list_reader(order, _reader(type_[1:], order), _alignment(type_[1:]))


def _fixed_reader(unpacker: struct.Struct) -> Reader:
    size = unpacker.size

    def read(data: bytes, position: int) -> tuple[Any, int]:
        position += -position % size
        return unpacker.unpack_from(data, position)[0], position + size

    return read


def _boolean_reader(order: str) -> Reader:
    unpack_u32 = _U32[order].unpack_from

    def read(data: bytes, position: int) -> tuple[bool, int]:
        position += -position % 4
        (value,) = unpack_u32(data, position)
        if value > 1:
            raise WireError(f"a D-Bus boolean is 0 or 1, not {value}")
        return value == 1, position + 4

    return read


def _string_reader(order: str) -> Reader:
    unpack_u32 = _U32[order].unpack_from

    def read(data: bytes, position: int) -> tuple[str, int]:
        position += -position % 4
        (length,) = unpack_u32(data, position)
        start = position + 4
        end = start + length
        if end >= len(data) or data[end] != 0:
            raise WireError("a D-Bus string runs past the message or lacks its NUL")
        return data[start:end].decode(), end + 1

    return read


def _read_signature(data: bytes, position: int) -> tuple[str, int]:
    end = position + 1 + data[position]
    if end >= len(data) or data[end] != 0:
        raise WireError("a D-Bus signature runs past the message or lacks its NUL")
    return data[position + 1 : end].decode("ascii"), end + 1


def _variant_reader(order: str) -> Reader:
    def read(data: bytes, position: int) -> tuple[Variant, int]:
        signature, position = _read_signature(data, position)
        # A signature seen before was checked when its reader was made.
        value_reader = _readers.get((signature, order))
        if value_reader is None:
            if len(split_signature(signature)) != 1:
                raise WireError(f"a variant holds one complete type, not {signature!r}")
            value_reader = _reader(signature, order)
        value, position = value_reader(data, position)
        return Variant._received(signature, value), position

    return read


def _struct_reader(readers: list[Reader]) -> Reader:
    def read(data: bytes, position: int) -> tuple[list[Any], int]:
        position += -position % 8
        members = []
        for member_reader in readers:
            member, position = member_reader(data, position)
            members.append(member)
        return members, position

    return read


def _array_bounds(data: bytes, position: int, unpack_u32: Callable, alignment: int) -> tuple[int, int]:
    """Where an array's elements start and end."""
    position += -position % 4
    (length,) = unpack_u32(data, position)
    start = position + 4
    start += -start % alignment
    end = start + length
    if length > MAX_ARRAY_LENGTH or end > len(data):
        raise WireError(f"a D-Bus array of {length} bytes runs past the message or the limit")
    return start, end


def _check_end(position: int, end: int) -> None:
    if position != end:
        raise WireError("a D-Bus array's elements do not fill its length")


def _bytes_reader(order: str) -> Reader:
    unpack_u32 = _U32[order].unpack_from

    def read(data: bytes, position: int) -> tuple[bytes, int]:
        start, end = _array_bounds(data, position, unpack_u32, 1)
        return bytes(data[start:end]), end

    return read


def _dict_reader(order: str, key_reader: Reader, value_reader: Reader) -> Reader:
    unpack_u32 = _U32[order].unpack_from

    def read(data: bytes, position: int) -> tuple[dict[Any, Any], int]:
        position, end = _array_bounds(data, position, unpack_u32, 8)
        entries = {}
        while position < end:
            key, position = key_reader(data, position + -position % 8)
            entries[key], position = value_reader(data, position)
        _check_end(position, end)
        return entries, end

    return read


def _list_reader(order: str, element_reader: Reader, alignment: int) -> Reader:
    unpack_u32 = _U32[order].unpack_from

    def read(data: bytes, position: int) -> tuple[list[Any], int]:
        position, end = _array_bounds(data, position, unpack_u32, alignment)
        items = []
        while position < end:
            item, position = element_reader(data, position)
            items.append(item)
        _check_end(position, end)
        return items, end

    return read


def unmarshal(signature: str, data: bytes, position: int = 0, order: str = "<") -> tuple[list[Any], int]:
    """The values of ``signature`` read from ``data`` at ``position``, and the position after them."""
    values = []
    for type_ in split_signature(signature):
        value, position = _reader(type_, order)(data, position)
        values.append(value)
    return values, position


# -- messages ----------------------------------------------------------------------------


class Message:
    """A message as read from the bus: its type, serials, header fields and body."""

    __slots__ = ("body", "fields", "serial", "type")

    def __init__(self, type_: int, serial: int, fields: dict[int, Any], body: list[Any]) -> None:
        self.type = type_
        self.serial = serial
        self.fields = fields
        self.body = body

    @property
    def reply_serial(self) -> int | None:
        return self.fields.get(REPLY_SERIAL)

    @property
    def error_name(self) -> str | None:
        return self.fields.get(ERROR_NAME)


def method_call(
    serial: int, destination: str, path: str, interface: str, member: str, signature: str, body: list[Any]
) -> bytes:
    """A METHOD_CALL message, ready to send."""
    encoded_body = marshal(signature, body)
    fields = [
        (PATH, Variant("o", path)),
        (INTERFACE, Variant("s", interface)),
        (MEMBER, Variant("s", member)),
        (DESTINATION, Variant("s", destination)),
    ]
    if signature:
        fields.append((SIGNATURE, Variant("g", signature)))
    # Byte order, type, flags (none: a reply is expected, and activation is allowed) and version.
    out = bytearray(b"l" + bytes((METHOD_CALL, 0, 1)))
    out += struct.pack("<II", len(encoded_body), serial)
    _writer("a(yv)")(out, fields)
    _pad(out, 8)
    out += encoded_body
    if len(out) > MAX_MESSAGE_LENGTH:
        raise WireError(f"a message of {len(out)} bytes is longer than D-Bus allows ({MAX_MESSAGE_LENGTH})")
    return bytes(out)


def _byte_order(data: bytes) -> str:
    marker = data[:1]
    if marker == b"l":
        return "<"
    if marker == b"B":
        return ">"
    raise WireError(f"not a D-Bus message: byte order {marker!r}")


def message_length(prefix: bytes) -> int:
    """The whole length of the message whose first :data:`PREFIX_LENGTH` bytes are ``prefix``."""
    body_length, _serial, fields_length = struct.unpack_from(_byte_order(prefix) + "III", prefix, 4)
    length = PREFIX_LENGTH + fields_length + -fields_length % 8 + body_length
    if length > MAX_MESSAGE_LENGTH:
        raise WireError(f"a message of {length} bytes is longer than D-Bus allows ({MAX_MESSAGE_LENGTH})")
    return length


def parse_message(data: bytes) -> Message:
    """One whole message, as :func:`message_length` delimits it."""
    order = _byte_order(data)
    if data[3] != 1:
        raise WireError(f"D-Bus protocol version {data[3]} is not 1")
    body_length, serial = struct.unpack_from(order + "II", data, 4)
    try:
        (fields,), position = unmarshal("a(yv)", data, 12, order)
        fields = {code: variant.value for code, variant in fields}
        position += -position % 8
        if position + body_length != len(data):
            raise WireError("the message's length does not match its header")
        body, position = unmarshal(fields.get(SIGNATURE, ""), data, position, order)
    except (struct.error, UnicodeDecodeError, IndexError) as exc:
        raise WireError(f"malformed D-Bus message: {exc}") from None
    if position != len(data):
        raise WireError("the message's body does not match its signature")
    return Message(data[1], serial, fields, body)
