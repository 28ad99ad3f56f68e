"""The node pair and its authenticated peer link (no D-Bus here).

- ``pairing``: the pair record (peer addresses, UDP port, shared key, the peer's node id
  once a handshake proved it) in ``pair.json``, 0600, apart from the exportable state.
- ``protocol``: the datagram format, HMAC-SHA256 tags, HKDF session keys, replay window.
- ``link``: the asyncio endpoint: handshake, two paths, pings (RTT, clock offset),
  requests with retries, drop counters.
- ``service``: ``Peer``, which the daemon owns and hands to the bus layer.

What replication and failover build on: ``PeerLink.handle(kind, handler)`` and
``PeerLink.request(kind, body)`` (bytes in, bytes out; bodies are their own MessagePack
dataclasses decoded with ``decoding.unpack``), retried over the up paths and run once per
request id; ``PeerLink.status()`` for connectivity; the pings are the heartbeat's base.
Nothing of a session survives a restart: keys, counters and windows live in memory only,
and the stored record holds the long-term key and the peer's node id.

Why UDP datagrams and not a TCP or TLS stream: the failover's heartbeats must arrive
sub-second over either path, and a stream over two paths would block one path behind the
other's lost segments; datagrams also make replay and reordering explicit, which the
counter window handles. Why an own HMAC scheme and not DTLS: the key is shared by two
nodes set up together, no certificates are wanted, and the standard library's ``hmac`` with
``compare_digest`` is all it needs; the per-session keys (HKDF over both nodes' fresh
nonces) give what DTLS's handshake would: nothing recorded in one session is accepted in
another. Payloads are not encrypted: the replication network is a private link and
replicated blocks will be as readable there as on the iSCSI network itself; integrity
and authenticity are what the pair must not lose.

Bitmaps and other payloads larger than ``protocol.MAX_PAYLOAD`` (about 60 KB) go as
several requests, each carrying an offset and a part (32 KiB of bitmap covers 16 GiB of
volume at 64 KiB per bit), so that no datagram is ever fragmented by IP.
"""
