"""Secrets that cross the peer link (the CHAP secrets of protected targets), encrypted.

The link authenticates every datagram (a forged or altered one is dropped) but does not
hide it, and the replication network is not always a cable between the two nodes. Each
secret is encrypted with a key derived from the pair key (HKDF, its own label), a random
16-byte nonce, and a keystream of HMAC-SHA256(key, nonce || block number): counter mode
with HMAC as the pseudo-random function. Its integrity is the link's tag over the whole
datagram. Secrets are short (CHAP allows 16 bytes): two blocks at most.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from applianced.errors import InvalidArgument
from applianced.peer.protocol import derived_key

NONCE_SIZE = 16
BLOCK = hashlib.sha256().digest_size
MAX_SECRET = 256
PURPOSE = b"secrets"


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = (length + BLOCK - 1) // BLOCK
    stream = b"".join(
        hmac.new(key, nonce + index.to_bytes(4, "big"), hashlib.sha256).digest() for index in range(blocks)
    )
    return stream[:length]


def seal(pair_key: bytes, secret: str) -> bytes:
    """``secret`` encrypted for the peer: nonce, then ciphertext."""
    plain = secret.encode()
    if len(plain) > MAX_SECRET:
        raise InvalidArgument(f"a secret of {len(plain)} bytes is longer than {MAX_SECRET}")
    key, nonce = derived_key(pair_key, PURPOSE), os.urandom(NONCE_SIZE)
    return nonce + bytes(a ^ b for a, b in zip(plain, _keystream(key, nonce, len(plain)), strict=True))


def unseal(pair_key: bytes, sealed: bytes) -> str:
    """The secret that ``seal`` encrypted with the same pair key."""
    if not NONCE_SIZE <= len(sealed) <= NONCE_SIZE + MAX_SECRET:
        raise InvalidArgument("a sealed secret of the peer has the wrong length")
    nonce, cipher = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
    key = derived_key(pair_key, PURPOSE)
    plain = bytes(a ^ b for a, b in zip(cipher, _keystream(key, nonce, len(cipher)), strict=True))
    try:
        return plain.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("a sealed secret of the peer does not decrypt to text") from None
