"""Reading sessions from LIO's files: the info text of a 6.1 kernel, counts and portals."""

from applianced.iscsi.kernel.model import Connection
from applianced.iscsi.kernel.sessions import established_connections, parse_acl_info, read_target_sessions

TARGET = "iqn.2003-01.org.linux-iscsi.applianced:t1"
INITIATOR = "iqn.2026-11.org.applianced.test:mpio-client"

# As a Debian 6.1 guest printed it, with an initiator logged in over IPv6.
LOGGED_IN = """InitiatorName: iqn.2026-11.org.applianced.test:mpio-client
InitiatorAlias: mpio
LIO Session ID: 2   ISID: 0x00 02 3d 00 00 02  TSIH: 2  SessionType: Normal
Session State: TARG_SESS_STATE_LOGGED_IN
---------------------[iSCSI Session Values]-----------------------
  CmdSN/WR  :  CmdSN/WC  :  ExpCmdSN  :  MaxCmdSN  :     ITT    :     TTT
 0x00000040   0x00000040   0x0000004c   0x0000008b   0x0000004d   0x0000004a
----------------------[iSCSI Connections]-------------------------
CID: 0  Connection State: TARG_CONN_STATE_LOGGED_IN
   Address ::1 TCP  StatSN: 0x4629adeb
"""
IDLE = "No active iSCSI Session for Initiator Endpoint: iqn.2026-11.org.applianced.test:other\n"


def test_info_of_a_logged_in_initiator():
    session = parse_acl_info(TARGET, INITIATOR, LOGGED_IN)
    assert (session.state, session.addresses, session.isid, session.tsih) == ("LOGGED_IN", ("::1",), "00023d000002", 2)


def test_info_of_an_idle_initiator():
    assert parse_acl_info(TARGET, INITIATOR, IDLE) is None


def make_tpg(root, portals, acls, count):
    tpg = root / TARGET / "tpgt_1"
    for portal in portals:
        (tpg / "np" / portal).mkdir(parents=True)
    for initiator, info in acls.items():
        (tpg / "acls" / initiator).mkdir(parents=True)
        (tpg / "acls" / initiator / "info").write_text(info)
    stats = root / TARGET / "fabric_statistics" / "iscsi_instance"
    stats.mkdir(parents=True)
    (stats / "sessions").write_text(f"{count}\n")
    return tpg


def test_multipath_shows_in_count_and_connections(tmp_path):
    tpg = make_tpg(tmp_path, ["127.0.0.1:3260", "[::1]:3260"], {INITIATOR: LOGGED_IN, "iqn.x:other": IDLE}, 2)
    connections = [
        Connection("127.0.0.1", 40000, "127.0.0.1:3260"),
        Connection("::1", 40001, "[::1]:3260"),
        Connection("10.9.9.9", 40002, "10.9.9.1:3261"),  # another target's portal
    ]
    found = read_target_sessions(tpg, TARGET, connections)
    assert found.count == 2
    assert [(s.initiator, s.portals) for s in found.sessions] == [(INITIATOR, ("[::1]:3260",))]
    assert found.connections == tuple(connections[:2])


def test_wildcard_portal_takes_any_local_address(tmp_path):
    tpg = make_tpg(tmp_path, ["0.0.0.0:3260"], {INITIATOR: LOGGED_IN.replace("::1", "::ffff:10.0.0.7")}, 1)
    connections = [Connection("10.0.0.7", 40000, "10.0.0.1:3260"), Connection("10.0.0.7", 40001, "10.0.0.1:22")]
    found = read_target_sessions(tpg, TARGET, connections)
    assert found.sessions[0].addresses == ("10.0.0.7",)
    assert found.sessions[0].portals == ("10.0.0.1:3260",)
    assert found.connections == (connections[0],)


def test_tcp_table(tmp_path):
    # Lines as a 6.1 guest printed them: a listener, and both ends of one connection each.
    (tmp_path / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:0CBC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11731 1\n"
        "   1: 0100007F:94C6 0100007F:0CBC 01 00000000:00000000 00:00000000 00000000     0        0 11858 1\n"
        "   2: 0100007F:0CBC 0100007F:94C6 01 00000000:00000000 00:00000000 00000000     0        0 11831 1\n"
    )
    (tmp_path / "tcp6").write_text(
        "  sl  local_address                         remote_address                        st\n"
        "   1: 00000000000000000000000001000000:0CBC 00000000000000000000000001000000:B16A 01 0\n"
        "   2: 0000000000000000FFFF00000700000A:0CBC 0000000000000000FFFF00000900000A:9C40 01 0\n"
    )
    found = established_connections([3260], [tmp_path / "tcp", tmp_path / "tcp6"])
    assert found == [
        Connection("127.0.0.1", 0x94C6, "127.0.0.1:3260"),
        Connection("::1", 0xB16A, "[::1]:3260"),
        Connection("10.0.0.9", 40000, "10.0.0.7:3260"),
    ]
