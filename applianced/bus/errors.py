"""The one mapping from engine errors to named D-Bus errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_fast import DBusError

from applianced.constants import error_name
from applianced.errors import ApplianceError

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def to_dbus_error(exc: Exception) -> DBusError:
    if isinstance(exc, ApplianceError):
        return DBusError(error_name(type(exc).__name__), str(exc))
    # Unforeseen failures: the traceback is for the operator's log, never for the caller.
    log.error("unexpected failure in a D-Bus method", exc_info=exc)
    return DBusError(error_name("Failed"), "internal error in applianced; see its log")


def translate_errors(handler: Handler) -> Handler:
    """Wrap a coroutine method handler so that every error leaves as a named D-Bus error."""

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        try:
            return await handler(*args)
        except DBusError:
            raise
        except Exception as exc:
            raise to_dbus_error(exc) from None

    return wrapper  # type: ignore[return-value]
