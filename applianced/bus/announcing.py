"""A D-Bus interface that announces its changed properties (PropertiesChanged) on refresh.

The engine's subsystems tell the bus layer "something changed" without saying what; the
interface compares its properties with what it announced last and sends only the changed
ones. Properties that change all the time (counters) are left out: they are read when asked.
"""

from typing import Any

from dbus_fast.service import ServiceInterface


class AnnouncingInterface(ServiceInterface):
    # Read when asked, never announced.
    LIVE: tuple[str, ...] = ("Counters",)

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._announced: dict[str, Any] = {}

    def start_announcing(self) -> None:
        """Take the current values as announced (at the end of the subclass's __init__)."""
        self._announced = self._values()

    def refresh(self) -> None:
        """Announce the properties that changed since the last announcement."""
        values = self._values()
        changed = {name: value for name, value in values.items() if self._announced.get(name) != value}
        self._announced = values
        if changed:
            self.emit_properties_changed(changed)

    def announced_names(self) -> list[str]:
        """The properties announced when they change: all but the LIVE ones."""
        return [prop.name for prop in self.introspect().properties if prop.name not in self.LIVE]

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.announced_names()}
