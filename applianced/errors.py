"""Errors raised by the engine.

Each class is one named error of the public API; the D-Bus layer maps the class to an
error name (``<ERROR_PREFIX>.<class name>``) and the CLI maps the name back to a sentence.
The message is meant for people and must never contain a secret.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error that the engine reports to its callers."""


class NotFound(ApplianceError):
    """The named object does not exist."""


class AlreadyExists(ApplianceError):
    """An object with that name or identity exists already."""


class InvalidArgument(ApplianceError):
    """An argument is malformed or out of range."""


class Busy(ApplianceError):
    """The object is in use (sessions, mappings) and the change would disrupt it."""


class NotSupported(ApplianceError):
    """The request is well-formed but this node cannot do it."""


class KernelError(ApplianceError):
    """The kernel refused a change; the previous configuration was put back."""


class StateError(ApplianceError):
    """The state file cannot be read or written."""


class Unreachable(ApplianceError):
    """The peer node did not answer: the change needs it and was not made on either node."""


class Incomplete(ApplianceError):
    """A change over both nodes stopped part-way and could not be put back: the message
    says what was done and what was not."""


ALL_ERRORS: tuple[type[ApplianceError], ...] = (
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Busy,
    NotSupported,
    KernelError,
    StateError,
    Unreachable,
    Incomplete,
)
