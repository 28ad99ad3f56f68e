"""The node's pair as the daemon holds it: the stored record and, while paired, the link.

The daemon owns one ``Peer`` and hands it to the bus layer; the engine does not know it.
Pairing and unpairing are serialised by a lock, and a failed pairing leaves neither a
file nor a socket behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from applianced.engine import audit
from applianced.errors import ALL_ERRORS, AlreadyExists, InvalidArgument, KernelError, NotFound, StateError, Unreachable
from applianced.peer.link import (
    REQUEST_TIMEOUT,
    Handler,
    LinkStatus,
    PeerLink,
    PeerRefused,
    PeerUnreachable,
    idle_status,
)
from applianced.peer.pairing import PairRecord, PairStore, new_record

log = logging.getLogger(__name__)

# How often a link that could not start (its address not configured yet at boot, its
# port taken) is tried again.
REOPEN_SECONDS = 5.0


class Peer:
    """Pairs this node, keeps the pair record and runs the peer link while paired."""

    def __init__(self, directory: Path, local_addresses: Callable[[], set[str]]) -> None:
        self.store = PairStore(directory)
        self.local_addresses = local_addresses
        self.record: PairRecord | None = None
        self.link: PeerLink | None = None
        self.node_id = ""
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._remembering: asyncio.Future[None] | None = None
        self._reopening: asyncio.Future[None] | None = None
        # Handlers of the peer's requests, installed on every link this node opens.
        self._handlers: dict[str, Handler] = {}

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after pairing, unpairing and every change of connectivity."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    async def start(self, node_id: str) -> None:
        """Load the pair record, if any, and start the link; a bad record is a StateError."""
        self.node_id = node_id
        async with self._lock:
            self.record = await asyncio.to_thread(self.store.load)
            if self.record is not None:
                try:
                    self.link = await self._open(self.record)
                except InvalidArgument as exc:
                    # The node serves its targets all the same; the pair shows every path
                    # down until the link can start.
                    log.error("the peer link is not running: %s; trying again every %g s", exc, REOPEN_SECONDS)
                    self._reopening = asyncio.ensure_future(self._reopen(self.record))
        self._notify()

    async def _reopen(self, record: PairRecord) -> None:
        while True:
            await asyncio.sleep(REOPEN_SECONDS)
            async with self._lock:
                if self.record is not record:
                    return
                try:
                    self.link = await self._open(record)
                except InvalidArgument:
                    continue
            log.info("the peer link is running now")
            self._notify()
            return

    async def close(self) -> None:
        if self._reopening:
            self._reopening.cancel()
        if self.link:
            await self.link.close()

    def handle(self, kind: str, handler: Handler) -> None:
        """Answer the peer's requests of ``kind`` with ``handler``, on this link and later ones."""
        self._handlers[kind] = handler
        if self.link:
            self.link.handle(kind, handler)

    async def request(
        self, kind: str, body: bytes, timeout: float = REQUEST_TIMEOUT, attempts: int = 3, every_path: bool = False
    ) -> bytes:
        """The peer's answer (PeerUnreachable when not paired or not connected, PeerRefused)."""
        if self.link is None:
            raise PeerUnreachable("this node is not paired" if self.record is None else "the peer link is not running")
        return await self.link.request(kind, body, timeout, attempts, every_path)

    async def ask(self, kind: str, body: bytes, timeout: float = REQUEST_TIMEOUT) -> bytes:
        """``request``, its failures raised as the engine's named errors: Unreachable when
        the peer did not answer, and the peer's refusal as the error it raised there."""
        try:
            return await self.request(kind, body, timeout=timeout)
        except PeerUnreachable as exc:
            raise Unreachable(f"the peer did not answer: {exc}") from None
        except PeerRefused as exc:
            error = next((cls for cls in ALL_ERRORS if cls.__name__ == exc.kind), KernelError)
            raise error(f"the peer refused: {exc}") from None

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.status().connected

    def status(self) -> LinkStatus | None:
        """The link's status while paired, None otherwise."""
        if self.record is None:
            return None
        return self.link.status() if self.link else idle_status(self.record)

    async def pair(self, peer_address: str, key: bytes, port: int, aux_address: str, local: list[str]) -> PairRecord:
        """Pair with the node at ``peer_address``; the same call is made on the peer."""
        async with self._lock:
            if self.record is not None:
                raise AlreadyExists(f"this node is paired with {self.record.peer_address} already; unpair first")
            configured = await asyncio.to_thread(self.local_addresses)
            record = new_record(peer_address, key, port, aux_address, local, configured)
            link = await self._open(record)
            try:
                await asyncio.to_thread(self.store.save, record)
            except BaseException:
                await link.close()
                raise
            self.record, self.link = record, link
        audit("pair-create", record.peer_address, "ok", f"paired with {', '.join(record.peer_addresses)}")
        self._notify()
        return record

    async def unpair(self) -> None:
        async with self._lock:
            if self.record is None:
                raise NotFound("this node is not paired")
            await asyncio.to_thread(self.store.delete)
            if self.link:
                await self.link.close()
            address, self.record, self.link = self.record.peer_address, None, None
        audit("pair-delete", address, "ok", f"unpaired from {address}")
        self._notify()

    async def _open(self, record: PairRecord) -> PeerLink:
        link = PeerLink(record, self.node_id, self._notify, self._identified)
        for kind, handler in self._handlers.items():
            link.handle(kind, handler)
        try:
            await link.start()
        except OSError as exc:
            raise InvalidArgument(f"cannot listen for the peer on UDP port {record.port}: {exc.strerror}") from None
        return link

    def _identified(self, peer_node: str) -> None:
        # Remembered so that from now on this node refuses every other one, also after a restart.
        self._remembering = asyncio.ensure_future(self._remember(peer_node))

    async def _remember(self, peer_node: str) -> None:
        async with self._lock:
            if self.record is None or self.record.peer_node:
                return
            record = dataclasses.replace(self.record, peer_node=peer_node)
            try:
                await asyncio.to_thread(self.store.save, record)
            except StateError as exc:
                log.error("the peer's node id is not remembered: %s", exc)
                return
            self.record = record
        audit("pair-identify", peer_node, "ok", f"the pair's node id is {peer_node}")
        self._notify()
