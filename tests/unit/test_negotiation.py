"""What sessions negotiated: LIO's login messages parsed, and kept by the sampler."""

from pathlib import Path

from applianced.iscsi.kernel.model import Session
from applianced.iscsi.kernel.negotiation import DEBUG_QUERIES, is_negotiation_line, parse
from tests.unit.test_initiators import T1, T2, Clock, counters, make_kernel, make_seen

# Messages of /dev/kmsg from a Debian 6.1 guest (tests/vm/test_negotiated.py): the end of a
# discovery login, a login with CRC32C digests, then one without digests and smaller bursts.
CAPTURED = (Path(__file__).parents[1] / "data" / "lio-login-messages.txt").read_text().splitlines()
CLIENT = "iqn.2026-11.org.applianced.test:negotiated-client"


def login(task, target, initiator, header_digest="None", max_burst="262144"):
    """The messages of one login as LIO prints them (shortened)."""
    dashes = "-" * 66
    connection = [dashes, f"HeaderDigest:                 {header_digest}", "DataDigest:   None", dashes]
    session = [dashes, f"TargetName: {target}", f"InitiatorName: {initiator}", f"MaxBurstLength: {max_burst}"]
    session += ["SessionType:                  Normal", dashes]
    return [f"[{task}] iscsi_set_connection_parameters: {line}" for line in connection] + [
        f"[{task}] iscsi_set_session_parameters: {line}" for line in session
    ]


def test_the_newest_login_of_a_session_wins_and_discovery_is_left_out():
    assert parse(CAPTURED) == {
        (T1, CLIENT): {
            "HeaderDigest": "None",
            "DataDigest": "None",
            "MaxXmitDataSegmentLength": "262144",
            "MaxRecvDataSegmentLength": "262144",
            "MaxConnections": "1",
            "InitialR2T": "Yes",
            "ImmediateData": "Yes",
            "MaxBurstLength": "131072",
            "FirstBurstLength": "32768",
            "DefaultTime2Wait": "2",
            "DefaultTime2Retain": "0",
            "MaxOutstandingR2T": "1",
            "DataPDUInOrder": "Yes",
            "DataSequenceInOrder": "Yes",
            "ErrorRecoveryLevel": "0",
        }
    }


def test_one_login_of_the_capture():
    crc = CAPTURED[: CAPTURED.index(next(line for line in CAPTURED if "HeaderDigest:" in line and "None" in line)) - 1]
    (values,) = parse(crc).values()
    assert (values["HeaderDigest"], values["DataDigest"], values["MaxBurstLength"]) == ("CRC32C", "CRC32C", "262144")


def test_logins_printed_at_the_same_time_by_two_tasks_are_kept_apart():
    first, second = login(11, T1, "iqn.a", "CRC32C"), login(12, T2, "iqn.b", "None", "65536")
    mixed = [line for pair in zip(first, second, strict=True) for line in pair]
    assert parse(mixed) == parse(first) | parse(second)
    assert parse(mixed)[T1, "iqn.a"]["HeaderDigest"] == "CRC32C"
    assert parse(mixed)[T2, "iqn.b"] == {"HeaderDigest": "None", "DataDigest": "None", "MaxBurstLength": "65536"}


def test_incomplete_blocks_and_other_messages_are_ignored():
    whole = login(11, T1, "iqn.a")
    assert parse(whole[1:]) == {(T1, "iqn.a"): {"MaxBurstLength": "262144"}}, "the connection block lost its start"
    assert parse(whole[:-1]) == {}, "the session block never ended"
    assert parse(["evm: HMAC attrs: 0x1", "iSCSI Login negotiation failed.", *whole]) == parse(whole)


def test_only_the_two_functions_messages_are_recognised():
    assert all(is_negotiation_line(line) for line in CAPTURED)
    assert not is_negotiation_line("[7] iscsi_target_login_thread: HeaderDigest: None")
    assert all("+p" in query for query in DEBUG_QUERIES)


def test_the_sampler_keeps_what_sessions_that_exist_negotiated(tmp_path):
    clock = Clock()
    kernel = make_kernel(T1)
    seen = make_seen(kernel, tmp_path, clock)
    seen.sample()
    kernel.kernel_log += CAPTURED
    kernel.login_counters[T1] = counters(accepts=1)
    kernel.session_list = [Session(T1, CLIENT, "LOGGED_IN", ("127.0.0.1",))]
    seen.sample()
    assert seen.negotiated(T1, CLIENT)["MaxBurstLength"] == "131072"
    assert seen.negotiated(T1, "iqn.other") == {}
    again = make_seen(kernel, tmp_path, clock)
    again.sample()
    assert again.negotiated(T1, CLIENT) == seen.negotiated(T1, CLIENT), "kept in the file over a restart"
    kernel.session_list = []
    again.sample()
    assert again.negotiated(T1, CLIENT) == {}, "forgotten with the session"
