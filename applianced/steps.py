"""The steps of a role change, each with how long it took: what the failover history keeps
and what replication logs, so that an operator sees where a stall went; and the report of a
step left to run in the background."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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


def log_failure(logger: logging.Logger, what: str) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a background task: logs ``what`` and the error if it failed."""

    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: %s", what, task.exception())

    return done
