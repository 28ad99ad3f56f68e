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
# the next file going to whichever worker frees up first. The two three-guest modules (about
# 20-25 minutes each) go first and last of the VM tier, the single-guest VM modules between
# them: side by side from the start, their six guests booting at once on two cores starved
# the daemons until a peer link renewed its session in the middle of the replication
# module's first mirror (one clean-clone run of two failed so). The host tiers, whose short
# files fill the end, come last.
FIRST = "tests/vm/test_failover.py"
LAST_OF_THE_VM_TIER = "tests/vm/test_replication.py"


def _run_order(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    if path == FIRST:
        return 0
    if item.get_closest_marker("vm"):
        return 2 if path == LAST_OF_THE_VM_TIER else 1
    return 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_run_order)  # stable: a file's tests keep their order
