"""The one mapping from engine errors to named D-Bus errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_fast import DBusError

from applianced.constants import error_name
from applianced.errors import ALL_ERRORS, ApplianceError

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def to_dbus_error(exc: Exception) -> DBusError:
    if isinstance(exc, ApplianceError):
        # A subclass (a device-mapper error is a KernelError) goes by its named error.
        named = next(cls for cls in type(exc).__mro__ if cls in ALL_ERRORS)
        return DBusError(error_name(named.__name__), str(exc))
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
