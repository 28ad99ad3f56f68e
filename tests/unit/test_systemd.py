"""sd_notify, the watchdog interval and the journal's native protocol."""

import logging
import socket

import pytest

from applianced import systemd


@pytest.fixture
def datagram_socket(tmp_path):
    path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notify_reaches_the_socket_and_is_silent_without_one(datagram_socket, monkeypatch):
    path, sock = datagram_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert systemd.notify("READY=1")
    assert sock.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path.parent / "gone"))
    assert not systemd.notify("READY=1")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_watchdog_interval_is_half_the_timeout_and_only_for_us(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


def parse_native(datagram: bytes) -> dict[str, str]:
    fields, rest = {}, datagram
    while rest:
        line, _, tail = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()], rest = value.decode(), tail
        else:
            size = int.from_bytes(tail[:8], "little")
            fields[line.decode()], rest = tail[8 : 8 + size].decode(), tail[8 + size + 1 :]
    return fields


def test_journal_records_carry_the_structured_fields(datagram_socket, monkeypatch):
    path, sock = datagram_socket
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(path))
    logger = logging.getLogger("test.journal")
    handler = systemd.JournalHandler("applianced")
    logger.addHandler(handler)
    try:
        logger.warning("created\nsecond line", extra={"OPERATION": "create-target", "OBJECT": "t1", "OUTCOME": "ok"})
    finally:
        logger.removeHandler(handler)
    fields = parse_native(sock.recv(65536))
    assert fields["MESSAGE"] == "created\nsecond line"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "applianced"
    assert (fields["OPERATION"], fields["OBJECT"], fields["OUTCOME"]) == ("create-target", "t1", "ok")
