"""appliancectl's output for people: tables and one-sentence errors."""

from dbus_fast import DBusError

from applianced.cli.main import render_table
from applianced.cli.messages import describe


def test_table_aligns_columns_and_formats_sizes_and_booleans():
    table = render_table(
        [
            {"name": "a", "size": 10 * 1024**3, "enabled": True},
            {"name": "longer-name", "size": 512, "enabled": False},
        ]
    )
    assert table.splitlines() == [
        "NAME         SIZE    ENABLED",
        "a            10 GiB  yes",
        "longer-name  512 B   no",
    ]
    assert render_table([]) == "(none)"


def test_each_named_error_becomes_a_sentence_and_an_exit_code():
    seen = set()
    for kind, code in (("NotFound", 3), ("AlreadyExists", 4), ("InvalidArgument", 5), ("Busy", 6)):
        message, exit_code = describe(DBusError(f"org.applianced.Appliance1.Error.{kind}", "disk 'x' said so"))
        assert exit_code == code
        assert message.endswith(": disk 'x' said so")
        seen.add(message.split(":")[0])
    assert len(seen) == 4
    message, code = describe(DBusError("org.freedesktop.DBus.Error.ServiceUnknown", "whatever"))
    assert (code, message.startswith("applianced is not running")) == (12, True)
    message, code = describe(DBusError("org.freedesktop.DBus.Error.AccessDenied", "rejected send message"))
    assert (code, "only root" in message) == (11, True)
    assert describe(DBusError("com.example.Other", "odd"))[1] == 1
