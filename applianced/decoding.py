"""Typed decoding of every document that enters the daemon from outside.

Imported configurations, targetcli files, disk trailers, the state file (possibly
written by an older version) and the payloads of the peer link (MessagePack, after their
authentication tag was checked) are decoded here, straight from their bytes into the
engine's own frozen dataclasses, before anything is touched. A value of the wrong type, a
missing field or malformed JSON becomes one ``InvalidArgument`` that names the field by
its path (``$.targets[0].luns[1].number``); the rules that go beyond types (names, sizes,
references between objects) stay with the operations in ``validation``.

The decoder is msgspec: it fills plain dataclasses from their annotations (the engine's
values need no base class of a library), it is strict (``"1"`` is not 1, ``true`` is not
1), and it is a small C extension: importing it took 13-22 ms on the host (7 ms of the
daemon's 245 ms import), against 90-110 ms for pydantic 2.14 with its core, and the
daemon's start under emulation is import-bound.
Deeply nested input never reaches Python's recursion limit on the way in: the schema
refuses an array where an object belongs at the first level that differs, and a nesting
that does reach msgspec's own recursion guard is refused like any malformed document.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from applianced.errors import InvalidArgument

T = TypeVar("T")


def decode(document: str | bytes, schema: type[T], what: str) -> T:
    """``document`` (JSON) as a ``schema`` value, or InvalidArgument naming ``what`` and the field."""
    return _decode(msgspec.json.decode, "JSON", document, schema, what)


def unpack(message: bytes, schema: type[T], what: str) -> T:
    """``message`` (MessagePack, the peer link's payloads) as a ``schema`` value, same errors."""
    return _decode(msgspec.msgpack.decode, "MessagePack", message, schema, what)


def _decode(decoder: Any, format_name: str, document: str | bytes, schema: type[T], what: str) -> T:
    try:
        return decoder(document, type=schema, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"{what} is malformed: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"{what} is not valid {format_name}: {exc}") from None
    except UnicodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply") from None


def convert(value: object, schema: type[T], what: str) -> T:
    """A value already parsed from JSON (dicts, lists, ...) as a ``schema`` value."""
    try:
        return msgspec.convert(value, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"{what} is malformed: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply") from None
