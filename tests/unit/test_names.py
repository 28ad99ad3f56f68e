"""iSCSI names (RFC 3720/3721) and object names."""

import pytest

from applianced.errors import InvalidArgument
from applianced.names import generate_target_iqn, normalize_iscsi_name, validate_object_name


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
        "iqn.2001-04.com.example",
        "iqn.1991-05.com.microsoft:host1.example.com",
        "iqn.1995-05.com.broadcom.11.22.33.44.55.66.iscsiboot",
        "eui.02004567a425678d",
        "naa.52004567ba64678d",
        "naa.6001405abcdef0123456789abcdef012",
    ],
)
def test_valid_iscsi_names(name):
    assert normalize_iscsi_name(name) == name


def test_names_are_compared_in_lower_case():
    assert normalize_iscsi_name("IQN.2001-04.COM.Example:Disk") == "iqn.2001-04.com.example:disk"
    assert normalize_iscsi_name("eui.02004567A425678D") == "eui.02004567a425678d"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "iqn.2001-4.com.example",
        "iqn.2001-13.com.example",
        "iqn.2001-04",
        "iqn.2001-04.com.example:has space",
        "iqn.2001-04.com.example:under_score",
        "iqn.2001-04.-bad.example",
        "eui.0200",
        "eui.02004567a425678g",
        "naa.1234",
        "wwn.0123456789abcdef",
        "iqn.2001-04.com.example:" + "a" * 200,
    ],
)
def test_invalid_iscsi_names(name):
    with pytest.raises(InvalidArgument):
        normalize_iscsi_name(name)


def test_length_limit_is_223_bytes():
    prefix = "iqn.2001-04.com.example:"
    assert normalize_iscsi_name(prefix + "a" * (223 - len(prefix)))
    with pytest.raises(InvalidArgument, match="223"):
        normalize_iscsi_name(prefix + "a" * (224 - len(prefix)))


def test_generated_iqn_is_valid_and_readable():
    assert generate_target_iqn("iqn.2003-01.org.linux-iscsi.applianced", "Vol_1") == (
        "iqn.2003-01.org.linux-iscsi.applianced:vol-1"
    )


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65, "é", ".hidden"])
def test_invalid_object_names(name):
    with pytest.raises(InvalidArgument):
        validate_object_name("disk", name)
