"""The pair record: who the peer is, how to reach it, and the shared key.

It lives in its own file, ``pair.json`` in the state directory (mode 0600, replaced
atomically like the state file), and not in ``state.json``: the configuration is exported,
imported and migrated as a whole, and a key must never travel with an export or be
replaced by an import. The key is held as bytes that no ``repr`` shows, so it never
reaches a log line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from applianced import decoding
from applianced.errors import InvalidArgument, StateError
from applianced.state import read_state_file, write_state_file
from applianced.validation import canonical_address, check_port

FILE_NAME = "pair.json"
FORMAT_VERSION = 1
# 256 bits: the strength of HMAC-SHA256; a short key would be the weakest link.
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096


@dataclass(frozen=True)
class PairRecord:
    """This node's half of a pair. ``peer_node`` is empty until a handshake proved it."""

    peer_address: str
    port: int
    key: bytes = field(repr=False)
    aux_address: str = ""
    local_addresses: tuple[str, ...] = ()
    peer_node: str = ""

    @property
    def peer_addresses(self) -> tuple[str, ...]:
        """The paths' peer addresses: the main one first, then the auxiliary one."""
        return (self.peer_address, self.aux_address) if self.aux_address else (self.peer_address,)


def new_record(
    peer_address: str, key: bytes, port: int, aux_address: str, local_addresses: list[str], configured: set[str]
) -> PairRecord:
    """A checked record; ``configured`` are this node's addresses (the local ones must be among them)."""
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidArgument(f"the pair key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes long")
    check_port(port)
    peers = [_peer_address(peer_address, configured)]
    if aux_address:
        peers.append(_peer_address(aux_address, configured))
        if peers[0] == peers[1]:
            raise InvalidArgument("the auxiliary address must differ from the peer address")
    local = tuple(dict.fromkeys(canonical_address(address) for address in local_addresses))
    for address in local:
        if ipaddress.ip_address(address).is_unspecified or address not in configured:
            raise InvalidArgument(f"address {address} is not configured on any interface of this node")
    for peer in peers:
        version = ipaddress.ip_address(peer).version
        if local and not any(ipaddress.ip_address(address).version == version for address in local):
            raise InvalidArgument(f"no local address of the same IP version as {peer}")
    return PairRecord(peers[0], port, key, peers[1] if aux_address else "", local)


def _peer_address(address: str, configured: set[str]) -> str:
    peer = canonical_address(address)
    parsed = ipaddress.ip_address(peer)
    if parsed.is_unspecified or parsed.is_multicast or peer in configured:
        raise InvalidArgument(f"{peer} cannot be the peer's address (it is not another host's unicast address)")
    if parsed.version == 6 and parsed.is_link_local:
        # It would need an interface (scope) that the record does not keep.
        raise InvalidArgument(f"{peer} is link-local; give the peer's global or unique local address")
    return peer


@dataclass(frozen=True)
class _Document:
    """The JSON shape of ``pair.json``; the key is written in hexadecimal."""

    version: int
    peer_address: str
    port: int
    key: str
    aux_address: str = ""
    local_addresses: tuple[str, ...] = ()
    peer_node: str = ""


class PairStore:
    """Reads, replaces and removes ``pair.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME

    def load(self) -> PairRecord | None:
        text = read_state_file(self.path)
        if text is None:
            return None
        try:
            document = decoding.decode(text, _Document, str(self.path))
            if document.version != FORMAT_VERSION:
                raise InvalidArgument(f"{self.path}: format version {document.version} is not supported")
            key = bytes.fromhex(document.key)
        except (InvalidArgument, ValueError) as exc:
            # ValueError's text is about the hexadecimal key: it names no key byte.
            raise StateError(f"{self.path} is unusable: {exc}") from None
        fields = dataclasses.asdict(document)
        del fields["version"]
        return PairRecord(**{**fields, "key": key})

    def save(self, record: PairRecord) -> None:
        document = {**dataclasses.asdict(record), "key": record.key.hex(), "version": FORMAT_VERSION}
        write_state_file(self.path, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")

    def delete(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {self.path}: {exc.strerror}") from exc
