"""Validation of the names that the API accepts: object names and iSCSI names.

iSCSI names follow RFC 3720 §3.2.6 and RFC 3721: the ``iqn.``, ``eui.`` and ``naa.``
forms, at most 223 bytes, and (RFC 3722) compared in lower case.
"""

from __future__ import annotations

import re

from applianced.errors import InvalidArgument

ISCSI_NAME_MAX_BYTES = 223

# Patterns are used with fullmatch: ``$`` would also match before a trailing newline.
# Object names end up in configfs directory names, file names and generated IQNs, so
# they are kept to characters that are safe in all three.
_OBJECT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_IQN_RE = re.compile(
    r"iqn\.(?P<year>[0-9]{4})-(?P<month>[0-9]{2})"
    r"\.(?P<authority>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::(?P<unique>[a-z0-9.:-]+))?"
)
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}")
_NAA_RE = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})")


def validate_object_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid name for a disk or target, else raise."""
    if not _OBJECT_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{kind} name {name!r} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def normalize_iscsi_name(name: str, what: str = "iSCSI name") -> str:
    """Return the canonical (lower-case) form of an iSCSI name, or raise InvalidArgument."""
    canonical = name.strip().lower()
    if not canonical:
        raise InvalidArgument(f"{what} is empty")
    if len(canonical.encode()) > ISCSI_NAME_MAX_BYTES:
        raise InvalidArgument(f"{what} {name!r} is longer than {ISCSI_NAME_MAX_BYTES} bytes")
    if canonical.startswith("iqn."):
        match = _IQN_RE.fullmatch(canonical)
        if not match:
            raise InvalidArgument(
                f"{what} {name!r} is not of the form iqn.YYYY-MM.reversed.domain[:unique] "
                "(letters, digits, '.', '-', ':')"
            )
        if not 1 <= int(match["month"]) <= 12:
            raise InvalidArgument(f"{what} {name!r} has an invalid month in its date")
        return canonical
    if canonical.startswith("eui."):
        if not _EUI_RE.fullmatch(canonical):
            raise InvalidArgument(f"{what} {name!r} must be 'eui.' followed by 16 hex digits")
        return canonical
    if canonical.startswith("naa."):
        if not _NAA_RE.fullmatch(canonical):
            raise InvalidArgument(f"{what} {name!r} must be 'naa.' followed by 16 or 32 hex digits")
        return canonical
    raise InvalidArgument(f"{what} {name!r} must start with 'iqn.', 'eui.' or 'naa.'")


def generate_target_iqn(prefix: str, target_name: str) -> str:
    """Build a target IQN from the naming-authority ``prefix`` and the target's name."""
    # Underscores are not allowed in iSCSI names; dashes keep the name readable.
    unique = target_name.lower().replace("_", "-")
    return normalize_iscsi_name(f"{prefix}:{unique}", "generated target IQN")
