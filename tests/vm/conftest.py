"""Fixtures of the VM tier: private networks (Lab) and guests that are always stopped.

Every guest gets a log directory (console, kernel log, harness requests, logs of
processes spawned in it) under ``$APPLIANCED_TEST_LOGS/vm-<run>/`` when that
variable is set (CI keeps it as an artifact), else under pytest's temporary
directory. Guests are stopped, and their logs collected, even when a test fails.
Booting costs ~20 s under TCG, so tests should share module-scoped guests where
they can (``module_guest_factory``, ``module_lab``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm.harness import Guest, HarnessError, Lab, check_platform, start_all


@pytest.fixture(scope="session")
def vm_log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding one sub-directory of logs per test (or per module)."""
    base = os.environ.get("APPLIANCED_TEST_LOGS")
    if base:
        root = Path(base).resolve() / time.strftime(f"vm-%Y%m%d-%H%M%S-{os.getpid()}")
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("vm-logs")


@pytest.fixture(scope="session")
def vm_platform() -> None:
    """Fail (never skip) with the list of what is missing to boot guests."""
    try:
        check_platform()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


def _slug(text: str) -> str:
    # Log directory names end up in vng/QEMU command lines: keep them plain.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "test"


class GuestFactory:
    """Makes guests whose logs go to one directory, and stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.guests: list[Guest] = []

    def __call__(self, name: str, *, start: bool = True, **kwargs: Any) -> Guest:
        """A new guest ``name`` (``Guest`` keyword arguments); booted unless ``start=False``."""
        guest = Guest(name, self.log_dir / name, **kwargs)
        self.guests.append(guest)
        if start:
            self._boot([guest])
        return guest

    def start_all(self, *guests: Guest) -> None:
        """Boot guests made with ``start=False`` in parallel."""
        self._boot(list(guests))

    def _boot(self, guests: list[Guest]) -> None:
        try:
            start_all(guests)
        except HarnessError as exc:
            pytest.fail(f"{exc}\n(logs: {self.log_dir})", pytrace=False)

    def close(self) -> None:
        # Reverse order: a client goes down before the servers it uses.
        for guest in reversed(self.guests):
            try:
                guest.stop()
            except Exception as exc:  # one broken guest must not leak the others
                print(f"stopping guest {guest.name} failed: {exc}")
        print(f"VM logs: {self.log_dir}")


def _factory(log_dir: Path) -> Iterator[GuestFactory]:
    factory = GuestFactory(log_dir)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def guest_factory(vm_platform: None, vm_log_root: Path, request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """Guests that live for one test."""
    yield from _factory(vm_log_root / _slug(request.node.nodeid))


@pytest.fixture(scope="module")
def module_guest_factory(
    vm_platform: None, vm_log_root: Path, request: pytest.FixtureRequest
) -> Iterator[GuestFactory]:
    """Guests shared by the tests of one module (boots are the slow part)."""
    yield from _factory(vm_log_root / _slug(request.module.__name__))


def _lab() -> Iterator[Lab]:
    lab = Lab(bridges=("lan", "hb"))
    try:
        lab.start()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield lab
    finally:
        # Also stops guests still plugged into it, whatever the teardown order.
        lab.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A private network namespace with bridges ``lan`` (data) and ``hb`` (heartbeat)."""
    yield from _lab()


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Lab]:
    """Like ``lab``, shared by the tests of one module."""
    yield from _lab()
