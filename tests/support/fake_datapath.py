"""An in-memory stand-in for replication's data path (``bridge.DataPath``), for the D-Bus tier.

The host kernel has no md, device-mapper or NBD, so the daemons of the D-Bus tier drive
this instead: each mirror's array and export are a few values kept in a JSON file beside
the fake kernel's (so that they outlive a daemon restart, as the kernel's devices do). An
export really listens on its address and port while it is served, so that the source's
"does the peer's export answer" is a real TCP connection, and a stopped daemon's export
is gone. It proves the service's logic only: the data path is proven in the VM tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from applianced.blockdev.md import ArrayStatus, Leg
from applianced.errors import KernelError
from applianced.replication import bitmap, bridge
from applianced.replication.bridge import PeerEndpoint, Volume

# Exports served by this process: (address, port) -> listening socket.
_SERVED: dict[tuple[str, int], socket.socket] = {}


class FakeDataPath:
    def __init__(self, state_dir: Path, store: Path) -> None:
        self.state_dir = state_dir
        self.store = store
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        return json.loads(self.store.read_text()) if self.store.exists() else {}

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        """The file's values, written back after the block, one thread at a time: the
        service changes several mirrors at once on threads, as the kernel allows."""
        with self._lock:
            data = self._load()
            yield data
            tmp = self.store.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.store)

    def mirror(self, volume: Volume) -> FakeMirror:
        return FakeMirror(self, volume)

    def export(self, volume: Volume) -> FakeExport:
        return FakeExport(self, volume)

    def prepare(self) -> None:
        pass

    def peer_answers(self, endpoint: PeerEndpoint, timeout: float = 2.0) -> bool:
        try:
            socket.create_connection((endpoint.address, endpoint.port), timeout=timeout).close()
        except OSError:
            return False
        return True

    def allocated(self, volume: Volume) -> list[tuple[int, int]]:
        if volume.is_file:
            region = bridge.region_size(volume.size, volume.region)
            return bridge.allocated_ranges(Path(volume.path), volume.size, region)
        return [(0, volume.regions)]

    def throttle(self, limits: list[Any]) -> None:
        """Kept for the tests to read (``throttles``): the real rules are tc's (tests/netns)."""
        with self._editing() as data:
            data["throttles"] = [[limit.address, limit.port, limit.kbit] for limit in limits if limit.kbit]

    def release(self, volume: Volume) -> None:
        with self._editing() as data:
            data.pop(volume.name, None)


class _Part:
    """One side's values in the JSON file: an array (source) or an export (target)."""

    def __init__(self, path: FakeDataPath, volume: Volume) -> None:
        self.path = path
        self.volume = volume

    def get(self) -> dict[str, Any]:
        return self.path._load().get(self.volume.name, {})

    def put(self, **changes: Any) -> None:
        with self.path._editing() as data:
            data[self.volume.name] = {**data.get(self.volume.name, {}), **changes}

    def intent_bitmap(self) -> bitmap.Bitmap:
        regions = self.volume.regions
        bits = bytearray(-(-regions // 8))
        for start, end in self.get().get("dirty", []):
            for region in range(start, end):
                bits[region // 8] |= 1 << (region % 8)
        return bitmap.Bitmap(bridge.region_size(self.volume.size, self.volume.region), regions, 1, bytes(bits))


class FakeArray:
    def __init__(self, mirror: FakeMirror) -> None:
        self.mirror = mirror

    def status(self) -> ArrayStatus:
        state = self.mirror.get()
        legs = [Leg("dm-0", frozenset({"in_sync"}))]
        peer = state.get("peer_leg")
        if peer == "in_sync" and not self.mirror.path.peer_answers(
            PeerEndpoint(state["peer"][0], "", state["peer"][1]), 0.5
        ):
            # The NBD client lost its server: the leg fails, as it does in the kernel.
            peer = "faulty"
            self.mirror.put(peer_leg=peer)
        if peer:
            legs.append(Leg("nbd0", frozenset({peer, "write_mostly"})))
        return ArrayStatus(
            name="md100",
            sync_action="idle",
            synced=0,
            sync_total=0,
            sync_speed=0,
            write_behind=state.get("write_behind", 0),
            max_behind_used=0,
            legs=tuple(legs),
        )


class FakeMirror(_Part):
    @property
    def node(self) -> str:
        return f"/run/applianced/block/{bridge.MIRROR_PREFIX}{self.volume.name}"

    def array(self) -> FakeArray | None:
        return FakeArray(self) if self.get().get("assembled") else None

    def status(self) -> ArrayStatus | None:
        array = self.array()
        return array.status() if array else None

    def has_metadata(self) -> bool:
        return bool(self.get().get("metadata"))

    def assemble(self) -> FakeArray:
        if not self.has_metadata():
            raise KernelError(f"no mirror metadata for {self.volume.name} on this node")
        state = self.get()
        if not state.get("assembled"):
            # Assembled from the local leg alone, as after a reboot.
            self.put(assembled=True, peer_leg=None)
        return FakeArray(self)

    def start(self, write_behind: int) -> ArrayStatus:
        self.assemble()
        self.set_write_behind(write_behind)
        return FakeArray(self).status()

    def prepare(self, fresh: bool = False) -> FakeArray | None:
        """The copy's array, from the export's metadata. Kept nowhere: what the service
        sees of a prepared array is the takeover that assembles it."""
        return FakeArray(self) if self.has_metadata() else None

    def adopt(self) -> FakeArray | None:
        """``prepare``'s array: a prepared array, kept nowhere, runs as long as the metadata is there."""
        return self.prepare()

    def discard(self) -> None:
        pass

    def take_over(self, write_behind: int, dirty: Sequence[tuple[int, int]] = ()) -> ArrayStatus:
        status = self.start(write_behind)
        self.mark_dirty(list(dirty))
        return status

    def create(self, peer: PeerEndpoint) -> FakeArray:
        self._reach(peer)
        self.put(metadata=True, assembled=True, peer_leg="in_sync", peer=[peer.address, peer.port], dirty=[])
        return FakeArray(self)

    def connect(self, peer: PeerEndpoint) -> str:
        self.assemble()
        if self.get().get("peer_leg") == "in_sync":
            return "/dev/nbd0"
        self._reach(peer)
        # The resync is instant here: the copy has everything the bitmap marked.
        self.put(peer_leg="in_sync", peer=[peer.address, peer.port], dirty=[])
        return "/dev/nbd0"

    def _reach(self, peer: PeerEndpoint) -> None:
        if not self.path.peer_answers(peer):
            raise KernelError(f"nbd-client {peer.address}: connection refused")

    def detach(self) -> None:
        if self.array() is not None:
            self.put(peer_leg=None)

    def mark_dirty(self, ranges: list[tuple[int, int]]) -> None:
        if self.array() is None:
            raise KernelError(f"the mirror of {self.volume.name} is not assembled")
        self.put(dirty=[*self.get().get("dirty", []), *map(list, ranges)])

    def set_write_behind(self, writes: int) -> None:
        if self.array() is not None:
            self.put(write_behind=writes)

    def set_resync_limit(self, kib_per_second: int) -> None:
        self.put(resync_limit=kib_per_second)

    def reset_queue_max(self) -> None:
        pass

    def grow(self, size: int) -> None:
        self.assemble()
        self.put(size=size)

    def disassemble(self) -> None:
        self.detach()
        self.stop()

    def stop_array(self) -> None:
        self.put(assembled=False, peer_leg=None)

    def stop(self) -> None:
        self.stop_array()


class FakeExport(_Part):
    def assemble(self, address: str, port: int, fresh: bool = False) -> None:
        if self.get().get("unlocked"):
            raise KernelError(f"the copy of {self.volume.name} is unlocked for reading; lock it first")
        if fresh:
            self.put(dirty=[])
        self.put(metadata=True, serving=[address, port])
        if (address, port) not in _SERVED:
            listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen()
            _SERVED[(address, port)] = listener

    def server_pid(self) -> int | None:
        serving = self.get().get("serving")
        return os.getpid() if serving and tuple(serving) in _SERVED else None

    def unlock_read_only(self) -> str:
        self._stop_server()
        self.put(unlocked=True)
        return f"/run/applianced/block/{bridge.COPY_PREFIX}{self.volume.name}"

    def lock(self) -> None:
        self.put(unlocked=False)

    def grow(self, size: int) -> None:
        self._stop_server()
        self.put(size=size)

    def fence(self) -> None:
        # The real one holds every I/O through the export from then on (failed when its
        # server stops): to the source, a server that no longer answers; a server gone is
        # as near as a stand-in comes.
        self._stop_server()

    def stop_serving(self) -> None:
        self._stop_server()
        self.put(unlocked=False)

    def disassemble(self) -> None:
        self.stop_serving()

    def _stop_server(self) -> None:
        serving = self.get().get("serving")
        if serving:
            listener = _SERVED.pop(tuple(serving), None)
            if listener is not None:
                listener.close()
        self.put(serving=None)
