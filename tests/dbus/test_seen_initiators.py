"""``appliancectl initiator seen`` against the real daemon, whose sampler reads the in-memory kernel.

The kernel's login activity is written to the file the fake kernel reads on every sample;
the sampler runs every few seconds, so the tests poll the CLI until a sighting shows.
"""

import json
import os
import time

from tests.support.daemon import INITIATOR

T1 = "iqn.2003-01.org.linux-iscsi.applianced:t1"
STRANGER = "iqn.2026-11.com.example:stranger"
LATE = "iqn.2026-11.com.example:late"


def set_activity(daemon, **activity):
    path = daemon.kernel_file.with_suffix(".activity.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(activity))
    os.replace(tmp, path)


def counters(**values):
    return {"counters": {T1: values}}


def not_authorized(name):
    return f"iSCSI Initiator Node: {name} is not authorized to access iSCSI target portal group: 1."


def seen(daemon, user=None):
    result = daemon.cli("--json", "initiator", "seen", user=user)
    assert result.returncode == 0, result.stderr
    return result.json()


def wait_for(daemon, predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        rows = seen(daemon)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"not seen in {timeout} s: {rows}"
        time.sleep(0.5)


def row(rows, initiator, outcome):
    return next((r for r in rows if r["initiator"] == initiator and r["outcome"] == outcome), None)


def test_logins_and_refusals_are_listed_with_reasons_and_kept_across_a_restart(daemon):
    daemon.configure_first_slice()
    session = {"target_iqn": T1, "initiator": INITIATOR, "addresses": ["10.0.0.7"]}
    set_activity(daemon, sessions=[session], **counters(accepts=1))
    rows = wait_for(daemon, lambda rows: row(rows, INITIATOR, "logged in"))
    logged_in = row(rows, INITIATOR, "logged in")
    # The count is 1, or 0 if the daemon's very first sample already saw the login (history).
    assert (logged_in["address"], logged_in["target"], logged_in["count"] in (0, 1)) == ("10.0.0.7", "t1", True)

    # One refusal outside the ACL (named by the kernel log), then two CHAP failures in one
    # sample, of which LIO names only the last.
    log = [not_authorized(STRANGER), "iSCSI Login negotiation failed."]
    refused = counters(accepts=1, authorize_fails=1, negotiate_fails=1, last_fail_address="10.0.0.9")
    set_activity(daemon, sessions=[session], log=log, **refused)
    wait_for(daemon, lambda rows: row(rows, STRANGER, "refused: not in ACL"))
    log += ["iSCSI Login negotiation failed."] * 2
    chap = counters(
        accepts=1,
        authorize_fails=1,
        authenticate_fails=2,
        negotiate_fails=3,
        last_fail_name=INITIATOR,
        last_fail_address="10.0.0.7",
    )
    set_activity(daemon, sessions=[session], log=log, **chap)
    rows = wait_for(daemon, lambda rows: row(rows, "(unnamed)", "refused: CHAP authentication failed"))
    assert {(r["initiator"], r["address"], r["outcome"], r["count"]) for r in rows if r["outcome"] != "logged in"} == {
        (STRANGER, "10.0.0.9", "refused: not in ACL", 1),
        (INITIATOR, "10.0.0.7", "refused: CHAP authentication failed", 1),
        ("(unnamed)", "-", "refused: CHAP authentication failed", 1),
    }
    assert [r["last_seen"] for r in rows] == sorted((r["last_seen"] for r in rows), reverse=True)

    table = daemon.cli("initiator", "seen").stdout
    assert table.splitlines()[0].split() == [
        "LAST_SEEN",
        "INITIATOR",
        "ADDRESS",
        "TARGET",
        "OUTCOME",
        "COUNT",
        "FIRST_SEEN",
    ]
    assert f"{STRANGER}  10.0.0.9" in table and "refused: not in ACL" in table
    assert seen(daemon, user="65534") == rows, "every user may read the list"

    counts = {(r["initiator"], r["outcome"]): r["count"] for r in rows}
    daemon.stop()
    daemon.start()
    assert {(r["initiator"], r["outcome"]): r["count"] for r in seen(daemon)} == counts
    # The first refusal after the restart is counted once, and nothing before it again.
    log += [not_authorized(LATE), "iSCSI Login negotiation failed."]
    late = chap["counters"][T1] | {
        "authorize_fails": 2,
        "negotiate_fails": 4,
        "last_fail_name": "",
        "last_fail_address": "10.0.0.10",
    }
    set_activity(daemon, sessions=[session], log=log, counters={T1: late})
    rows = wait_for(daemon, lambda rows: row(rows, LATE, "refused: not in ACL"))
    assert {(r["initiator"], r["outcome"]): r["count"] for r in rows} == counts | {(LATE, "refused: not in ACL"): 1}
    assert (daemon.state_dir / "initiators.json").stat().st_mode & 0o777 == 0o600


def test_the_list_is_empty_before_anything_was_seen(daemon):
    assert seen(daemon) == []
    assert daemon.cli("initiator", "seen").stdout.strip() == "(none)"
