"""Fixtures of the D-Bus tier: a running daemon (in-memory kernel) on the private bus."""

import pytest

from tests.support.daemon import Daemon


@pytest.fixture
def daemon(bus, tmp_path):
    node = Daemon(bus.address, tmp_path)
    node.start()
    yield node
    if node.process:
        node.stop()
