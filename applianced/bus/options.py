"""The ``a{sv}`` options argument that every method takes last."""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from applianced.errors import InvalidArgument


class Options:
    """The ``a{sv}`` options argument: known keys with checked types, unknown keys refused."""

    def __init__(self, method: str, options: dict[str, Variant], allowed: dict[str, str]) -> None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InvalidArgument(f"{method} does not take option(s) {', '.join(unknown)}")
        for key, variant in options.items():
            if variant.signature != allowed[key]:
                raise InvalidArgument(
                    f"option {key} of {method} must have type '{allowed[key]}', not '{variant.signature}'"
                )
        self._values = {key: variant.value for key, variant in options.items()}

    def get(self, key: str, default: Any) -> Any:
        return self._values.get(key, default)

    def values(self) -> dict[str, Any]:
        """The options that were given, by name."""
        return dict(self._values)
