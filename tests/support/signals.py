"""Listening to the daemon's signals in tests."""

from dbus_fast import Message
from dbus_fast.aio import MessageBus


async def watch_properties(bus: MessageBus, path: str) -> None:
    """Ask the bus to deliver the PropertiesChanged signals of ``path`` to ``bus``."""
    rule = f"type='signal',interface='org.freedesktop.DBus.Properties',path='{path}'"
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )
    )
