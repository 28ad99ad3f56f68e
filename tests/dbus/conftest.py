"""Fixtures of the D-Bus tier: a private bus with the shipped policy and a running daemon."""

import pytest

from tests.support.daemon import REPO, Daemon
from tests.support.private_bus import PrivateBus

POLICY = REPO / "dbus" / "org.applianced.Appliance1.conf"


@pytest.fixture
def bus():
    private = PrivateBus(POLICY)
    private.start()
    yield private
    private.stop()


@pytest.fixture
def daemon(bus, tmp_path):
    node = Daemon(bus.address, tmp_path)
    node.start()
    yield node
    if node.process:
        node.stop()
