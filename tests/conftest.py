"""Shared fixtures (the private system bus with the shipped policy) and the run's order."""

import pytest

from tests.support.daemon import REPO
from tests.support.private_bus import PrivateBus

POLICY = REPO / "dbus" / "org.applianced.Appliance1.conf"


@pytest.fixture
def bus():
    private = PrivateBus(POLICY)
    private.start()
    yield private
    private.stop()


# tools/test runs one worker per core (pytest-xdist), each taking one test file at a time,
# the next file going to whichever worker frees up first. Longest first, so that no long file
# starts last while the other workers idle: the replication and failover modules (three
# guests each, about half an hour each, one on each worker), then the rest of the VM tier (a
# minute or more per file), then the host tiers, whose short files fill the end.
LONGEST_FIRST = ("tests/vm/test_replication.py", "tests/vm/test_failover.py")


def _run_order(item: pytest.Item) -> tuple[int, int]:
    longest = item.nodeid.split("::", 1)[0] in LONGEST_FIRST
    return (0 if longest else 1, 0 if item.get_closest_marker("vm") else 1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_run_order)  # stable: a file's tests keep their order
