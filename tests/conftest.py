"""Shared fixtures: the private system bus with the shipped policy."""

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
