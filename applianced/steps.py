"""The steps of a role change, each with how long it took: what the failover history keeps
and what replication logs, so that an operator sees where a stall went."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Steps:
    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    async def run(self, name: str, work: Awaitable[T]) -> T:
        started = time.monotonic()
        result = await work
        self.done.append((name, time.monotonic() - started))
        return result


def describe(steps: list[tuple[str, float]]) -> str:
    """``name 120 ms, other 3 ms``."""
    return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in steps)
