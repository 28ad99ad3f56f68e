"""The node every fuzz example runs against, and the invariants checked after each call.

One daemon serves a whole test module. Before each example the node is put back into a
known baseline (its own export, imported with force) with prepared files beside it, so
that examples do not depend on each other; after each call the invariants are checked
relative to the snapshot taken just before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Variant

from applianced.constants import ERROR_PREFIX, MANAGER_INTERFACE, PEER_INTERFACE, PEER_PATH, ROOT_PATH, STATE_FILE_NAME
from tests.support.api_client import ApiClient, Method, Outcome
from tests.support.daemon import INITIATOR, Daemon

# Every error a caller may get from the daemon; Failed is a bug.
NAMED_ERRORS = frozenset(
    f"{ERROR_PREFIX}.{kind}"
    for kind in ("NotFound", "AlreadyExists", "InvalidArgument", "Busy", "NotSupported", "KernelError", "StateError")
)
# dbus-fast's own answer for a path that holds no object with that interface: the call
# never reached the daemon's code.
NO_SUCH_OBJECT = frozenset({"org.freedesktop.DBus.Error.UnknownObject", "org.freedesktop.DBus.Error.UnknownMethod"})
# Python leaking into an error text meant for people.
PYTHON_REPR = re.compile(
    r"Traceback|<class '|<function |object at 0x|\[Errno |\b[A-Z]\w*(?:Error|Exception)\(|"
    r"\bb'\\x|\bb\"\\x|\bb''|PosixPath\(|frozenset\(|dict_keys\(|\bNone\b|\bTrue\b|\bFalse\b"
)

# Files the kernel changes by itself (/proc/net/tcp6 whenever a socket opens): an argument
# naming one, as a fuzzed CHAP secret may, says nothing about what a failed call wrote.
KERNEL_FILES = ("/proc/", "/sys/")

MIB = 1024 * 1024
TRAILER_SIZE = 4096
MAGIC = b"APPLIANCED-DISK\n"
# The largest file that is hashed whole; bigger (sparse, extended) files are hashed at both ends.
HASH_WHOLE = 16 * MIB


def trailer(name: Any, serial: Any, size: Any, version: Any = 1, **extra: Any) -> bytes:
    """A disk trailer as applianced writes it (any field may be given a forged value)."""
    payload = MAGIC + json.dumps({"version": version, "name": name, "serial": serial, "size": size, **extra}).encode()
    return payload.ljust(TRAILER_SIZE, b"\0")


def write_disk_file(path: Path, data_size: int, end: bytes) -> None:
    """A sparse file of ``data_size`` zero bytes followed by ``end`` (a trailer, forged or not)."""
    with path.open("wb") as f:
        f.truncate(data_size)
        f.seek(data_size)
        f.write(end)


def fingerprint(path: Path) -> tuple[Any, ...] | None:
    """What must not change when a call fails: kind, size, mtime and content of one path."""
    try:
        st = path.lstat()
    except OSError:
        return None
    kind = st.st_mode >> 12
    digest = ""
    if path.is_symlink():
        digest = os.readlink(path)
    elif path.is_file() and not str(path).startswith(("/proc/", "/sys/", "/dev/")):
        h = hashlib.sha256()
        with path.open("rb") as f:
            if st.st_size <= HASH_WHOLE:
                h.update(f.read())
            else:
                h.update(f.read(MIB))
                f.seek(st.st_size - MIB)
                h.update(f.read())
        digest = h.hexdigest()
    return (kind, st.st_size, st.st_mtime_ns, digest)


@dataclass
class Snapshot:
    files: dict[str, tuple[Any, ...] | None] = field(default_factory=dict)

    def differences(self, other: Snapshot) -> list[str]:
        return [
            f"{path}: {self.files.get(path)} -> {other.files.get(path)}"
            for path in sorted(set(self.files) | set(other.files))
            if self.files.get(path) != other.files.get(path)
        ]


def strings_in(value: Any) -> list[str]:
    """Every string inside a D-Bus argument (variants, arrays and dictionaries included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Variant):
        return strings_in(value.value)
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list | tuple):
        return [s for item in value for s in strings_in(item)]
    return []


class World:
    """A daemon on a private bus, its baseline configuration and the files tests may name."""

    def __init__(self, bus_address: str, directory: Path) -> None:
        self.directory = directory
        self.daemon = Daemon(bus_address, directory)
        self.base = directory / "base"  # backing files of the baseline's disks
        self.files = directory / "files"  # prepared files that calls may name; rebuilt per example
        self.state_file = self.daemon.state_dir / STATE_FILE_NAME
        self.disks_dir = self.daemon.state_dir / "disks"
        self.firewall_file = directory / "firewall.json"
        self.client: ApiClient | None = None
        self.baseline = ""
        self.base_fingerprints: dict[Path, tuple[Any, ...] | None] = {}
        self.base_bytes: dict[Path, bytes] = {}
        self.forged = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.base.mkdir()
        self.daemon.start()
        self.client = ApiClient(self.daemon.bus_address)
        self._build_baseline()

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.daemon.process:
            try:
                self.daemon.stop()
            except subprocess.TimeoutExpired:
                self.daemon.stop(signal.SIGKILL)

    def restart(self) -> None:
        """After a hang or a crash: a fresh daemon on the same state, for the next examples."""
        self.client.close()
        if self.daemon.process and self.daemon.process.poll() is None:
            self.daemon.stop(signal.SIGKILL)
        self.daemon.process = None
        self.daemon.start()
        self.client = ApiClient(self.daemon.bus_address)

    def _must(self, outcome: Outcome, what: str) -> list[Any]:
        assert outcome.ok, f"{what}: {outcome}"
        return outcome.body

    def manager(self, member: str, signature: str = "", body: list[Any] | None = None) -> Outcome:
        return self.client.call(ROOT_PATH, MANAGER_INTERFACE, member, signature, body)

    def _build_baseline(self) -> None:
        """Two disks, two targets (one with CHAP), a LUN, an ACL, a portal, a boot profile."""
        d1 = str(self.base / "d1.img")
        self._must(self.manager("CreateDisk", "sta{sv}", ["d1", MIB, {"path": Variant("s", d1)}]), "d1")
        self._must(self.manager("CreateDisk", "sta{sv}", ["d2", 2 * MIB, {}]), "d2")
        t1 = self._must(self.manager("CreateTarget", "sa{sv}", ["t1", {}]), "t1")[0]
        t2 = self._must(self.manager("CreateTarget", "sa{sv}", ["t2", {}]), "t2")[0]
        self._must(self.manager("CreatePortal", "sqa{sv}", ["127.0.0.1", 3260, {}]), "portal")
        target = "org.applianced.Appliance1.Target"
        self._must(self.client.call(t1, target, "AddLun", "oa{sv}", [f"{ROOT_PATH}/disks/d1", {}]), "lun")
        self._must(self.client.call(t1, target, "AddAcl", "sa{sv}", [INITIATOR, {}]), "acl")
        chap = {"user": Variant("s", "alice"), "secret": Variant("s", "alice-secret1")}
        self._must(self.client.call(t2, target, "SetChap", "a{sv}a{sv}", [chap, {}]), "chap")
        self._must(
            self.manager(
                "CreateBootProfile", "sosa{sv}", ["pc1", t1, INITIATOR, {"portal": Variant("s", "192.0.2.10")}]
            ),
            "boot",
        )
        (self.baseline,) = self._must(self.manager("ExportConfiguration", "a{sv}", [{}]), "export")
        for disk in json.loads(self.baseline)["disks"]:
            path = Path(disk["path"])
            self.base_bytes[path] = path.read_bytes()
            self.base_fingerprints[path] = fingerprint(path)

    def reset(self) -> None:
        """The baseline configuration, its disk files as they were, fresh prepared files."""
        if self.daemon.process is None or self.daemon.process.poll() is not None:
            self.restart()
        for path, content in self.base_bytes.items():
            if fingerprint(path) != self.base_fingerprints[path]:
                path.write_bytes(content)
                os.utime(path, ns=(self.base_fingerprints[path][2],) * 2)
        outcome = self.manager("ImportConfiguration", "sa{sv}", [self.baseline, {"force": Variant("b", True)}])
        assert outcome.ok, f"the node does not take its baseline configuration back: {outcome}"
        # A pair is not part of the configuration: an example that made one unpairs here.
        if PEER_PATH in self.objects():
            assert self.client.call(PEER_PATH, PEER_INTERFACE, "Delete", "a{sv}", [{}]).ok
        for stray in self.disks_dir.iterdir():
            if Path(stray) not in self.base_bytes:
                stray.unlink()
        shutil.rmtree(self.files, ignore_errors=True)
        self.files.mkdir()
        self._prepare_files()

    def _prepare_files(self) -> None:
        f = self.files
        os.mkfifo(f / "fifo")
        (f / "dir").mkdir()
        (f / "empty").touch()
        write_disk_file(f / "plain.img", MIB, b"")
        # A targetcli backstore: exactly the LUN's size, no trailer yet.
        write_disk_file(f / "tc.img", MIB, b"")
        # A disk file that applianced made on another node: importable.
        write_disk_file(f / "spare.img", MIB, trailer("spare", str(uuid.UUID(int=7)), MIB))
        (f / "link").symlink_to(f / "spare.img")
        (f / "dangling").symlink_to(f / "nowhere")

    def forge(self, data_size: int, end: bytes) -> str:
        """A prepared disk file with a forged end; its path."""
        self.forged += 1
        path = self.files / f"forged-{self.forged}.img"
        write_disk_file(path, data_size, end)
        return str(path)

    # -- the object tree ---------------------------------------------------------------------

    def objects(self) -> dict[str, dict[str, Any]]:
        (objects,) = self._must(self.client.objects(), "GetManagedObjects")
        return objects

    def paths_of(self, interface: str) -> list[str]:
        return sorted(path for path, interfaces in self.objects().items() if interface in interfaces)

    # -- invariants ---------------------------------------------------------------------------

    def snapshot(self, args: list[Any]) -> Snapshot:
        paths = {self.state_file, self.daemon.kernel_file, self.firewall_file}
        for directory in (self.base, self.files, self.disks_dir):
            paths |= set(directory.rglob("*")) if directory.exists() else set()
        named = (s for s in strings_in(args) if s.startswith("/") and "\0" not in s)
        paths |= {Path(s) for s in named if not os.path.realpath(s).startswith(KERNEL_FILES)}
        return Snapshot({str(p): fingerprint(p) for p in paths})

    def call(self, path: str, method: Method, args: list[Any]) -> Outcome:
        """One fuzzed call with every invariant checked around it."""
        before = self.snapshot(args)
        outcome = self.client.method(path, method, args)
        where = f"{method.key} on {path} with {args!r}"
        if outcome.timed_out:
            self.restart()
            raise AssertionError(f"no answer within {self.client.timeout} s to {where}")
        alive = self.client.property(ROOT_PATH, MANAGER_INTERFACE, "Version")
        if not alive.ok:
            self.restart()
            raise AssertionError(f"the daemon stopped answering after {where}: {alive}")
        if outcome.error:
            if outcome.error in NO_SUCH_OBJECT:
                assert path not in self.objects(), f"{outcome} from an existing object: {where}"
            else:
                assert outcome.error in NAMED_ERRORS, f"{outcome} for {where}"
            # The caller's own values, quoted back to it, are not Python speaking ('False').
            text = outcome.text
            for value in strings_in(args):
                text = text.replace(repr(value), "'…'")
            assert not PYTHON_REPR.search(text), f"Python in the error text {outcome.text!r} for {where}"
            changed = before.differences(self.snapshot(args))
            assert not changed, f"{outcome} for {where}, but files changed:\n" + "\n".join(changed)
        objects = self.client.objects()
        assert objects.ok, f"GetManagedObjects fails after {where}: {objects}"
        if outcome.ok:
            self.check_disk_files(where)
        return outcome

    def check_disk_files(self, where: str) -> None:
        """Every file-backed disk's file ends with the trailer that records it."""
        exported = self.manager("ExportConfiguration", "a{sv}", [{}])
        assert exported.ok, f"ExportConfiguration fails after {where}: {exported}"
        for disk in json.loads(exported.body[0])["disks"]:
            if disk["kind"] != "file":
                continue
            path = Path(disk["path"])
            assert path.stat().st_size == disk["size"] + TRAILER_SIZE, f"{path} has the wrong size after {where}"
            with path.open("rb") as f:
                f.seek(disk["size"])
                end = f.read()
            assert end.startswith(MAGIC), f"{path} lost its trailer after {where}"
            recorded = json.loads(end[len(MAGIC) :].rstrip(b"\0"))
            expected = {"version": 1, "name": disk["name"], "serial": disk["serial"], "size": disk["size"]}
            assert recorded == expected, f"{path}'s trailer says {recorded} after {where}"

    def check_round_trip(self) -> None:
        """The node can always export its configuration and import it again, unchanged."""
        exported = self.manager("ExportConfiguration", "a{sv}", [{}])
        assert exported.ok, f"ExportConfiguration: {exported}"
        (document,) = exported.body
        imported = self.manager("ImportConfiguration", "sa{sv}", [document, {"force": Variant("b", True)}])
        assert imported.ok, f"the node does not import its own export: {imported}\n{document}"
        again = self.manager("ExportConfiguration", "a{sv}", [{}])
        assert again.ok and json.loads(again.body[0]) == json.loads(document), "the import changed the configuration"
