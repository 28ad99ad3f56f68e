"""Stable object paths: one per entity, named after it, escaped for D-Bus."""

from __future__ import annotations

from applianced.constants import BOOT_PROFILES_PATH, DISKS_PATH, JOBS_PATH, MIRRORS_PATH, PORTALS_PATH, TARGETS_PATH


def escape(element: str) -> str:
    """Escape a name into a path element: every byte outside [A-Za-z0-9] becomes _xx."""
    if not element:
        return "_"
    return "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}" for b in element.encode())


def disk_path(name: str) -> str:
    return f"{DISKS_PATH}/{escape(name)}"


def target_path(name: str) -> str:
    return f"{TARGETS_PATH}/{escape(name)}"


def lun_path(target: str, number: int) -> str:
    return f"{target_path(target)}/luns/{number}"


def acl_path(target: str, initiator: str) -> str:
    return f"{target_path(target)}/acls/{escape(initiator)}"


def portal_path(key: str) -> str:
    return f"{PORTALS_PATH}/{escape(key)}"


def boot_profile_path(name: str) -> str:
    return f"{BOOT_PROFILES_PATH}/{escape(name)}"


def mirror_path(disk: str) -> str:
    return f"{MIRRORS_PATH}/{escape(disk)}"


def job_path(number: int) -> str:
    return f"{JOBS_PATH}/{number}"
