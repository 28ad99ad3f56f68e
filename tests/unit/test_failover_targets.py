"""Protected targets on their way to the passive node: secrets sealed, LUNs on the copies."""

import pytest

from applianced.errors import InvalidArgument, NotFound
from applianced.failover import targets
from applianced.peer import secrets
from applianced.state import Acl, Chap, Lun, Target

KEY = b"k" * 32
TARGET = Target(
    name="t1",
    iqn="iqn.2003-01.org.linux-iscsi.applianced:t1",
    luns=(Lun(3, "d1", read_only=True), Lun(5, "d2")),
    acls=(Acl("iqn.1994-05.com.redhat:c1", Chap("alice", "alice-secret1", "t1", "mutual-secret")), Acl("iqn.x:c2")),
    chap=Chap("bob", "bob-secret-123"),
    allowed_sources=("10.0.0.0/24",),
)


def test_secrets_travel_sealed_and_arrive_whole():
    prepared = targets.outgoing(TARGET, KEY)
    wire = repr(prepared)
    for secret in ("alice-secret1", "mutual-secret", "bob-secret-123"):
        assert secret not in wire
    arrived = targets.incoming(prepared, KEY, {"d1": "c1", "d2": "d2"})
    assert arrived.acls == TARGET.acls and arrived.chap == TARGET.chap
    assert arrived.luns == (Lun(3, "c1", read_only=True), Lun(5, "d2"))
    assert (arrived.iqn, arrived.allowed_sources, arrived.enabled) == (TARGET.iqn, TARGET.allowed_sources, False)


def test_a_lun_without_a_copy_here_is_refused():
    with pytest.raises(NotFound, match="'d2' of LUN 5 of 't1' has no copy"):
        targets.incoming(targets.outgoing(TARGET, KEY), KEY, {"d1": "c1"})


def test_a_sealed_secret_opens_only_with_the_pair_key_and_differs_each_time():
    one, two = secrets.seal(KEY, "alice-secret1"), secrets.seal(KEY, "alice-secret1")
    assert one != two and secrets.unseal(KEY, one) == secrets.unseal(KEY, two) == "alice-secret1"
    try:
        opened = secrets.unseal(b"j" * 32, one)
    except InvalidArgument:  # not even text
        opened = None
    assert opened != "alice-secret1"
    with pytest.raises(InvalidArgument):
        secrets.unseal(KEY, b"short")
