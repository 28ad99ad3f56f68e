"""Parsing virtual addresses and building the failover's ICMP messages (no sockets)."""

import struct

import pytest

from applianced.errors import InvalidArgument
from applianced.failover import announce, pingnode
from applianced.failover.addresses import VirtualAddress


def test_virtual_addresses_are_parsed_to_canonical_form():
    assert VirtualAddress.parse("eth1", "10.0.0.10/24") == VirtualAddress("eth1", "10.0.0.10", 24)
    assert VirtualAddress.parse("eth1", "FD00:0::10/64") == VirtualAddress("eth1", "fd00::10", 64)
    assert VirtualAddress.parse("eth1", "fd00::10/64").version == 6


@pytest.mark.parametrize(
    ("interface", "text", "message"),
    [
        ("eth1", "10.0.0.10", "needs its prefix length"),
        ("eth1", "10.0.0.300/24", "not an address"),
        ("eth1", "127.0.0.5/8", "not a unicast address"),
        ("eth1", "fe80::5/64", "not a unicast address"),
        ("eth1", "224.0.0.5/24", "not a unicast address"),
        ("", "10.0.0.10/24", "not an interface name"),
        ("a-very-long-interface-name", "10.0.0.10/24", "not an interface name"),
    ],
)
def test_bad_virtual_addresses_are_named(interface, text, message):
    with pytest.raises(InvalidArgument, match=message):
        VirtualAddress.parse(interface, text)


def test_the_internet_checksum_of_an_echo_request_verifies():
    request = pingnode._echo(4, 0x1234, 1, b"payload!")
    assert request[0] == pingnode.ECHO_REQUEST_V4
    assert pingnode.checksum(request) == 0  # a message with its checksum sums to zero
    assert pingnode.checksum(b"\x00\x01\xf2") == ~(0x0001 + 0xF200) & 0xFFFF  # odd length: padded


def test_an_arp_announcement_names_the_address_as_sender_and_target():
    mac, address = bytes.fromhex("020000000001"), bytes([10, 0, 0, 10])
    frame = announce._arp_frame(mac, announce.ARP_REQUEST, address, b"\0" * 6, address)
    assert frame[:6] == announce.BROADCAST_MAC and frame[6:12] == mac
    operation, sender_mac, sender, _, target = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
    assert (operation, sender_mac, sender, target) == (announce.ARP_REQUEST, mac, address, address)


def test_the_solicited_node_group_of_an_address():
    assert announce._solicited_node_group("fd00::12:3456") == "ff02::1:ff12:3456"
