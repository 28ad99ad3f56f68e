"""Boot throw-away QEMU guests for applianced's storage and cluster tests.

The development and CI machines run a kernel without LIO, configfs,
device-mapper or nbd (see shared/design/test-platform.md), so everything that
touches the iSCSI target runs in guests booted here: Debian's full kernel from
/boot, started by virtme-ng under TCG (KVM hangs on these machines), sharing
the host's root file system read-only so that the venv, the checkout and the
apt-installed tools are usable inside.

Pieces:

* :class:`Guest` boots one VM and gives a persistent command channel into it:
  ``tests/vm/guest_agent.py`` runs as the guest's ``--exec`` command and serves
  JSON-line requests over a dedicated virtio-serial port whose host end is a
  Unix socket. ``run()`` executes shell commands as root with a timeout,
  ``spawn()``/``kill()`` manage background processes whose output lands in a
  host directory, and the guest console is saved under the guest's log
  directory so failures can be diagnosed.
* :class:`Lab` creates a private network namespace holding Linux bridges; a
  guest's NICs are tap devices on those bridges, so guests can talk to each
  other and nothing reaches the machine's real network.
* Setup helpers prepare what applianced needs inside a guest: configfs and the
  LIO modules, writable ``/etc/target`` and ``/var/lib/applianced``, a system
  dbus-daemon with our policy, and ``iscsid``.

Writable paths in a guest: virtme-ng mounts tmpfs-backed overlays on /etc,
/home, /opt, /srv, /usr, /var, /tmp and /lib; /run is a tmpfs; everything else
(including the checkout and /root) is the read-only host root. Writes to the
overlays live in guest RAM and vanish at poweroff; the host is never written
except through the per-guest shared directory (``Guest.shared_dir``) and the
extra disk images.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

log = logging.getLogger(__name__)

#: The checkout this file belongs to (tests/vm/harness.py -> repo root), so the
#: harness works from any clone, not just the developers' /work/main.
REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_PATH = Path(__file__).resolve().with_name("guest_agent.py")
#: Where the project's D-Bus bus policy lives in the checkout.
DEFAULT_DBUS_POLICY = REPO_ROOT / "dbus" / "org.applianced.Appliance1.conf"

#: virtio-serial port name of the command channel (guest: /dev/virtio-ports/NAME).
AGENT_PORT_NAME = "org.applianced.harness"
#: Where the guest sees its per-guest shared (host-writable) directory.
GUEST_SHARED_DIR = "/run/harness"

#: Modules LIO needs for a file-backed iSCSI target; tests may load more.
LIO_MODULES: tuple[str, ...] = (
    "configfs",
    "target_core_mod",
    "iscsi_target_mod",
    "target_core_file",
    "target_core_iblock",
)

# Extra time allowed on top of a command's own timeout before the host gives
# up on the channel: under TCG a loaded guest answers slowly.
_CHANNEL_MARGIN_S = 30.0
# How often the host re-sends its hello while the guest is still booting.
_HELLO_INTERVAL_S = 2.0
_DEFAULT_BOOT_TIMEOUT_S = 300.0
# Names end up in a shell command line built by vng and in QEMU option
# strings, where ',' is a separator: keep them boring.
_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9_./+:@-]+$")
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")


class HarnessError(Exception):
    """The harness could not do what it was asked (platform, boot, setup)."""


class GuestError(HarnessError):
    """A guest failed to boot, died, or stopped answering on its channel."""


class CommandError(HarnessError):
    """A command run with ``check=True`` failed; ``result`` holds its output."""

    def __init__(self, message: str, result: Completed) -> None:
        super().__init__(message)
        self.result = result


class CommandTimeout(CommandError):
    """A command outlived its timeout and was killed inside the guest."""


@dataclass(frozen=True)
class Completed:
    """Outcome of :meth:`Guest.run`, shaped like ``subprocess.CompletedProcess``."""

    cmd: str | list[str]
    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0
    timed_out: bool = False

    @property
    def returncode(self) -> int:
        return self.rc

    def describe(self) -> str:
        """Multi-line summary used in error messages."""
        return (
            f"command: {self.cmd!r}\nrc: {self.rc} (timed out: {self.timed_out}, "
            f"{self.duration:.1f}s)\n--- stdout ---\n{_tail(self.stdout)}\n"
            f"--- stderr ---\n{_tail(self.stderr)}"
        )


@dataclass(frozen=True)
class Disk:
    """An extra disk for a guest, backed by a sparse file on the host.

    With ``path`` unset the image is created in the guest's log directory and
    deleted by ``stop()``; with ``path`` set it is created if missing and kept,
    so that a later guest (a "rebooted node") can be given the same disk.
    Inside the guest use :meth:`Guest.disk_device` to find its device node.
    """

    name: str
    size: int | str = "1G"
    path: Path | str | None = None
    bus: Literal["virtio", "scsi"] = "virtio"


@dataclass(frozen=True)
class Nic:
    """A guest NIC plugged into bridge ``bridge`` of the guest's :class:`Lab`.

    ``address`` (CIDR, e.g. ``10.99.0.1/24``) is configured in the guest after
    boot. ``mac`` defaults to a stable value derived from guest name and slot.
    """

    bridge: str
    address: str | None = None
    mac: str | None = None


def parse_size(size: int | str) -> int:
    """Bytes in ``size`` (an int, or a string like ``"512M"`` / ``"2G"``)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {size!r}")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(m.group(1)) * 1024**power


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def _version_key(path: Path) -> list[Any]:
    # Natural sort so that vmlinuz-6.10 sorts after vmlinuz-6.9.
    parts = re.split(r"(\d+)", path.name)
    return [int(p) if p.isdigit() else p for p in parts]


def find_kernel() -> Path:
    """The guest kernel: ``$APPLIANCED_VM_KERNEL`` or the newest /boot/vmlinuz-*."""
    override = os.environ.get("APPLIANCED_VM_KERNEL")
    if override:
        return Path(override)
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise HarnessError(
            "no guest kernel: /boot/vmlinuz-* is missing (apt-get install --no-install-recommends linux-image-amd64)"
        )
    return kernels[-1]


def find_vng() -> Path:
    """The virtme-ng launcher, preferring the one next to the running Python."""
    beside = Path(sys.executable).parent / "vng"
    if beside.exists():
        return beside
    found = shutil.which("vng")
    if not found:
        raise HarnessError("virtme-ng is not installed (pip install virtme-ng)")
    return Path(found)


def check_platform(*, need_network: bool = False) -> None:
    """Raise :class:`HarnessError` naming everything missing to boot guests."""
    problems: list[str] = []
    try:
        kernel = find_kernel()
        if not os.access(kernel, os.R_OK):
            problems.append(f"kernel {kernel} is not readable")
        moddir = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")
        if not moddir.is_dir():
            problems.append(f"modules for {kernel.name} missing ({moddir})")
    except HarnessError as exc:
        problems.append(str(exc))
    try:
        find_vng()
    except HarnessError as exc:
        problems.append(str(exc))
    if not shutil.which("qemu-system-x86_64"):
        problems.append("qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
    if not shutil.which("busybox"):
        problems.append("busybox missing (apt-get install busybox-static)")
    if need_network:
        if os.geteuid() != 0:
            problems.append("network namespaces need root")
        if not Path("/dev/net/tun").exists():
            problems.append("/dev/net/tun missing (no tap devices)")
        if not shutil.which("ip"):
            problems.append("ip (iproute2) missing")
    if problems:
        raise HarnessError("cannot run VM tests here:\n  " + "\n  ".join(problems))


def _check_safe_path(path: Path, what: str) -> None:
    if not _SAFE_PATH_RE.match(str(path)):
        raise HarnessError(f"{what} {str(path)!r} has characters that vng/QEMU command lines cannot carry")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def _remove_stale_socket_dirs() -> None:
    # A test process killed before its teardown leaves its socket directory;
    # the pid in the name tells whether the owner is gone.
    for path in Path(tempfile.gettempdir()).glob("vmh-*-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


class Lab:
    """A private network for guests: one network namespace with bridges in it.

    Guest NICs become tap devices on these bridges and QEMU runs inside the
    namespace, so guest traffic never touches the machine's real interfaces.
    Use as a context manager or call ``start()``/``close()``.
    """

    PREFIX = "aplab"

    def __init__(self, bridges: Iterable[str] = ("lan",), *, prefix: str = PREFIX) -> None:
        # The pid in the name lets a later run recognise namespaces leaked by
        # a test process that was killed before its teardown ran.
        self.ns = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = prefix
        self._wanted = list(bridges)
        self.bridges: list[str] = []
        self._taps = itertools.count()
        self._lock = threading.Lock()
        self._guests: set[Guest] = set()
        self.started = False

    def start(self) -> Lab:
        check_platform(need_network=True)
        self._remove_stale()
        _ip("netns", "add", self.ns)
        self.started = True
        _ip("-n", self.ns, "link", "set", "lo", "up")
        for name in self._wanted:
            self.add_bridge(name)
        log.info("lab %s started with bridges %s", self.ns, self.bridges)
        return self

    def _remove_stale(self) -> None:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.fullmatch(rf"{re.escape(self.prefix)}-(\d+)-[0-9a-f]+", name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                log.warning("removing namespace %s left by dead process", name)
                subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def add_bridge(self, name: str) -> str:
        """Create bridge ``name`` in the namespace (names are private to it)."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", name):
            raise HarnessError(f"bad bridge name {name!r}")
        # A MAC of its own: a bridge otherwise takes its lowest port's, and changes it when
        # that guest goes, so that the namespace's own address (a ping node) would vanish
        # from the guests' ARP caches whenever a guest is killed.
        mac = "02:ab:" + ":".join(f"{byte:02x}" for byte in hashlib.sha256(name.encode()).digest()[:4])
        _ip("-n", self.ns, "link", "add", name, "address", mac, "type", "bridge")
        # No STP and no forwarding delay: ports forward as soon as they are up,
        # and heartbeat tests must not see a 15 s learning phase.
        _ip("-n", self.ns, "link", "set", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        _ip("-n", self.ns, "link", "set", name, "up")
        self.bridges.append(name)
        return name

    def create_tap(self, bridge: str) -> str:
        """A persistent tap device on ``bridge`` for one QEMU NIC."""
        if bridge not in self.bridges:
            raise HarnessError(f"lab {self.ns} has no bridge {bridge!r} (has {self.bridges})")
        with self._lock:
            tap = f"tap{next(self._taps)}"
        _ip("-n", self.ns, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip("-n", self.ns, "link", "set", tap, "master", bridge, "up")
        return tap

    def delete_tap(self, tap: str) -> None:
        subprocess.run(["ip", "-n", self.ns, "link", "del", tap], capture_output=True)

    def add_address(self, bridge: str, cidr: str) -> None:
        """Give the namespace itself an address on ``bridge``.

        Host-side tools run through :meth:`run` (e.g. libiscsi's userspace
        initiator) can then reach the guests without leaving the namespace.
        """
        _ip("-n", self.ns, "addr", "add", cidr, "dev", bridge)

    def run(self, cmd: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a host command inside the lab's namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def exec_prefix(self) -> list[str]:
        """Argv prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def attach(self, guest: Guest) -> None:
        with self._lock:
            self._guests.add(guest)

    def detach(self, guest: Guest) -> None:
        with self._lock:
            self._guests.discard(guest)

    def close(self) -> None:
        """Stop guests still plugged in, then delete the namespace."""
        with self._lock:
            guests = list(self._guests)
        # Whatever order fixtures tear down in, no QEMU outlives its network.
        for guest in guests:
            with contextlib.suppress(Exception):
                guest.stop(timeout=30)
        if not self.started:
            return
        # Deleting the namespace also deletes its bridges and taps.
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        self.started = False
        log.info("lab %s removed", self.ns)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Pending:
    event: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None


class Guest:
    """One QEMU guest booted by virtme-ng, driven through guest_agent.py.

    ``start()`` blocks until the agent answers (or raises :class:`GuestError`
    with the console tail); ``launch()`` + ``wait_ready()`` let several guests
    boot in parallel (see :func:`start_all`). All commands run as root.
    """

    def __init__(
        self,
        name: str,
        log_dir: Path | str,
        *,
        memory: str = "1536M",
        cpus: int = 1,
        disks: Sequence[Disk] = (),
        nics: Sequence[Nic] = (),
        lab: Lab | None = None,
        kernel: Path | str | None = None,
        boot_timeout: float = _DEFAULT_BOOT_TIMEOUT_S,
        python: Path | str | None = None,
        rwdirs: Mapping[str, Path | str] | None = None,
        extra_vng_args: Sequence[str] = (),
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9-]{1,40}", name):
            raise HarnessError(f"guest name {name!r} must be a short hostname")
        if nics and lab is None:
            raise HarnessError("NICs need a Lab to plug into")
        for disk in disks:
            if not _SAFE_NAME_RE.match(disk.name):
                raise HarnessError(f"disk name {disk.name!r}: 1-20 of [A-Za-z0-9_-]")
        self.name = name
        self.log_dir = Path(log_dir).resolve()
        self.memory = memory
        self.cpus = cpus
        self.disks = list(disks)
        self.nics = list(nics)
        self.lab = lab
        self.kernel = Path(kernel) if kernel else None
        self.boot_timeout = boot_timeout
        # The agent is stdlib-only; the Python running the tests is certainly
        # on the shared root, so the guest can run it too.
        self.python = Path(python) if python else Path(sys.executable)
        # Guest path -> host directory, shared writable: state that must
        # survive a guest's reboot (e.g. /var/lib/applianced of a "node").
        self.rwdirs = {guest: Path(host).resolve() for guest, host in (rwdirs or {}).items()}
        self.extra_vng_args = list(extra_vng_args)

        self.boot_seconds: float | None = None
        self.nic_names: list[str] = []
        self.macs: list[str] = [nic.mac or self._default_mac(i) for i, nic in enumerate(self.nics)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._console_thread: threading.Thread | None = None
        self._reader_thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._sock_dir: Path | None = None
        self._send_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed_reason: str | None = None
        self._taps: list[str] = []
        self._owned_disks: list[Path] = []
        self._disk_paths: dict[str, Path] = {}
        self._launched_at = 0.0
        self._harness_log: IO[str] | None = None
        self._active = False  # resources (taps, sockets, disks) are held

    # -- paths -------------------------------------------------------------

    @property
    def console_log(self) -> Path:
        """Kernel console, virtme-ng and agent messages of this guest."""
        return self.log_dir / "console.log"

    @property
    def log_path(self) -> Path:
        return self.console_log

    @property
    def harness_log(self) -> Path:
        """Every request the host made, with rc and timing."""
        return self.log_dir / "harness.log"

    @property
    def shared_dir(self) -> Path:
        """Host directory that the guest sees, writable, at GUEST_SHARED_DIR."""
        return self.log_dir / "shared"

    def console_output(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle ---------------------------------------------------------

    def _default_mac(self, slot: int) -> str:
        # Locally administered, stable per (guest, slot) so logs are readable
        # and re-booting "the same node" keeps its MAC.
        h = zlib.crc32(f"{self.name}/{slot}".encode())
        b = h.to_bytes(4, "big")
        return f"52:54:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}:{slot & 0xFF:02x}"

    def _note(self, msg: str) -> None:
        if self._harness_log is not None:
            stamp = time.strftime("%H:%M:%S")
            self._harness_log.write(f"{stamp} {msg}\n")
            self._harness_log.flush()

    def _prepare_disks(self) -> list[str]:
        opts: list[str] = []
        scsi_added = False
        for disk in self.disks:
            if disk.path is None:
                path = self.log_dir / "disks" / f"{disk.name}.img"
                path.parent.mkdir(parents=True, exist_ok=True)
                self._owned_disks.append(path)
            else:
                path = Path(disk.path).resolve()
            _check_safe_path(path, "disk image")
            if not path.exists():
                # Sparse: a "10G" disk costs nothing until the guest writes it.
                with open(path, "wb") as f:
                    f.truncate(parse_size(disk.size))
            self._disk_paths[disk.name] = path
            drive = f"hd-{disk.name}"
            opts += ["-drive", f"if=none,id={drive},file={path},format=raw,cache=writeback"]
            # The device id lets unplug_disk() pull it out through QMP.
            device = f"id=disk-{disk.name},drive={drive},serial={disk.name}"
            if disk.bus == "virtio":
                opts += ["-device", f"virtio-blk-pci,{device}"]
            else:
                if not scsi_added:
                    opts += ["-device", "virtio-scsi-pci,id=hscsi"]
                    scsi_added = True
                opts += ["-device", f"scsi-hd,bus=hscsi.0,{device}"]
        return opts

    def _prepare_nics(self) -> list[str]:
        opts: list[str] = []
        assert self.lab is not None or not self.nics
        for i, nic in enumerate(self.nics):
            assert self.lab is not None
            tap = self.lab.create_tap(nic.bridge)
            self._taps.append(tap)
            opts += [
                "-netdev",
                f"tap,id=nic{i},ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=nic{i},mac={self.macs[i]}",
            ]
        return opts

    def command_line(self) -> list[str]:
        """The argv that launches this guest (for logs and debugging)."""
        assert self._sock_dir is not None
        kernel = self.kernel or find_kernel()
        sock = self._sock_dir / "agent.sock"
        qemu_opts = [
            # The command channel: its own virtio-serial controller so the
            # port never competes with the ones virtme-ng wires to stdio.
            "-chardev",
            f"socket,id=hagent,path={sock},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=hserial",
            "-device",
            f"virtserialport,bus=hserial.0,chardev=hagent,name={AGENT_PORT_NAME}",
            # QEMU's machine protocol, for what happens to the hardware (unplug_disk).
            "-qmp",
            f"unix:{self._sock_dir / 'qmp.sock'},server=on,wait=off",
        ]
        qemu_opts += self._prepare_disks()
        qemu_opts += self._prepare_nics()
        agent_cmd = shlex.join(
            [
                str(self.python),
                str(AGENT_PATH),
                "--port",
                f"/dev/virtio-ports/{AGENT_PORT_NAME}",
                "--log-dir",
                f"{GUEST_SHARED_DIR}/logs",
            ]
        )
        argv = [
            str(find_vng()),
            "--run",
            str(kernel),
            # /dev/kvm exists on these machines but guests hang with it.
            "--disable-kvm",
            # A PCI machine: virtio-net-pci/virtio-blk-pci need it.
            "--disable-microvm",
            # Debian's /usr/lib/qemu/virtiofsd is the old C one that vng
            # cannot start: it would waste ~3 s per boot before falling back.
            "--force-9p",
            # Show the kernel console (it goes to console.log).
            "--verbose",
            "--name",
            self.name,
            "--memory",
            self.memory,
            "--cpus",
            str(self.cpus),
            "--rwdir",
            f"{GUEST_SHARED_DIR}={self.shared_dir}",
            *[f"--rwdir={guest}={host}" for guest, host in self.rwdirs.items()],
            *self.extra_vng_args,
            f"--exec={agent_cmd}",
            # "=" form: the value starts with "-", which argparse would take
            # for an option. vng pastes it into a shell command line as is.
            "--qemu-opts=" + " ".join(qemu_opts),
        ]
        if self.nics:
            assert self.lab is not None
            argv = self.lab.exec_prefix() + argv
        return argv

    def launch(self) -> None:
        """Start QEMU without waiting for the guest to come up."""
        if self._active:
            raise HarnessError(f"guest {self.name} already launched")
        check_platform(need_network=bool(self.nics))
        _check_safe_path(self.log_dir, "log directory")
        for guest_path, host_path in self.rwdirs.items():
            _check_safe_path(Path(guest_path), "guest directory")
            _check_safe_path(host_path, "shared directory")
            host_path.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.shared_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._active = True
        try:
            self._launch()
        except BaseException:
            # Taps, sockets and disk images made so far must not leak.
            self._terminate()
            raise

    def _launch(self) -> None:
        self._harness_log = open(self.harness_log, "a", encoding="utf-8")  # noqa: SIM115
        # AF_UNIX paths are limited to 108 bytes; log dirs can be deep.
        _remove_stale_socket_dirs()
        self._sock_dir = Path(tempfile.mkdtemp(prefix=f"vmh-{os.getpid()}-"))
        if self.lab is not None:
            self.lab.attach(self)
        argv = self.command_line()
        self._note("launch: " + shlex.join(argv))
        env = dict(os.environ)
        # vng runs its helpers (virtme-run) through $PATH.
        env["PATH"] = f"{find_vng().parent}:{env.get('PATH', '/usr/bin:/bin')}"
        self._launched_at = time.monotonic()
        # stdout/stderr must be a pipe: vng's QEMU reopens /proc/self/fd/1 and
        # /2 several times (console, script stdout/stderr); on a regular file
        # each reopen truncates and writes at its own offset, garbling the log.
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,  # so stop() can kill vng, sh and QEMU at once
        )
        self._console_thread = threading.Thread(target=self._pump_console, name=f"{self.name}-console", daemon=True)
        self._console_thread.start()

    def _pump_console(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.console_log, "ab") as out:
            for line in iter(self._proc.stdout.readline, b""):
                out.write(line)
                out.flush()

    def wait_ready(self) -> None:
        """Wait (bounded by ``boot_timeout``) until the agent answers."""
        assert self._proc is not None and self._sock_dir is not None
        deadline = self._launched_at + self.boot_timeout
        sock_path = self._sock_dir / "agent.sock"
        try:
            self._connect(sock_path, deadline)
            self._hello(deadline)
        except GuestError:
            self._note("boot failed")
            self._terminate()
            raise
        self.boot_seconds = time.monotonic() - self._launched_at
        self._note(f"ready after {self.boot_seconds:.1f}s")
        log.info("guest %s ready after %.1fs", self.name, self.boot_seconds)
        self._set_clock()
        self._configure_nics()

    def _set_clock(self) -> None:
        """Set the guest's clock to the host's, as NTP would on a real node: the emulated
        RTC starts it at whole seconds, so two guests could boot up to a second apart (and
        a failover pair refuses to start with clocks 1 s apart). Off by the one-way delay
        of the command only."""
        self.run(["date", "-s", f"@{time.time():.3f}"], timeout=30)

    def start(self) -> Guest:
        """Boot the guest and wait until its command channel is ready."""
        self.launch()
        self.wait_ready()
        return self

    def _fail(self, msg: str) -> GuestError:
        proc = self._proc
        state = "not running"
        if proc is not None:
            if self._closed_reason is not None:
                # The channel drops a moment before QEMU exits: let it finish
                # so the message carries the exit status and the last console
                # lines (often the reason, e.g. a kernel panic).
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            rc = proc.poll()
            state = "QEMU still running" if rc is None else f"QEMU exited with status {rc}"
            if rc is not None and self._console_thread is not None:
                self._console_thread.join(timeout=5)
        return GuestError(
            f"guest {self.name}: {msg} ({state})\nconsole log: {self.console_log}\n"
            f"--- console tail ---\n{_tail(self.console_output(), 3000)}"
        )

    def _check_alive(self) -> None:
        assert self._proc is not None
        rc = self._proc.poll()
        if rc is not None:
            if self._console_thread is not None:
                self._console_thread.join(timeout=5)
            raise self._fail(f"QEMU/vng exited with status {rc} during boot")

    def _connect(self, sock_path: Path, deadline: float) -> None:
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._fail(f"agent socket {sock_path} never appeared")
            if sock_path.exists():
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(sock_path))
                except OSError:
                    sock.close()
                else:
                    self._sock = sock
                    break
            time.sleep(0.1)
        self._reader_thread = threading.Thread(target=self._read_responses, name=f"{self.name}-reader", daemon=True)
        self._reader_thread.start()

    def _hello(self, deadline: float) -> None:
        # QEMU accepts the connection long before the guest opens its end of
        # the port, and what it does with bytes sent meanwhile is not ours to
        # rely on: keep saying hello until one is answered.
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"agent did not answer within {self.boot_timeout:.0f}s")
            try:
                info = self._request({"op": "ping"}, wait=min(_HELLO_INTERVAL_S, remaining), during_boot=True)
            except TimeoutError:
                continue
            self._note(f"agent up: kernel {info.get('uname')}, uptime {info.get('uptime')}s")
            return

    def _read_responses(self) -> None:
        assert self._sock is not None
        reader = self._sock.makefile("rb")
        reason = "channel closed by QEMU"
        try:
            for line in reader:
                try:
                    msg = json.loads(line)
                    rid = int(msg["id"])
                except (ValueError, KeyError, TypeError):
                    log.warning("guest %s: malformed response %r", self.name, line[:200])
                    continue
                with self._pending_lock:
                    pending = self._pending.pop(rid, None)
                if pending is None:
                    continue  # an answer to a hello or a request we gave up on
                pending.response = msg
                pending.event.set()
        except OSError as exc:
            reason = f"channel error: {exc}"
        self._closed_reason = reason
        with self._pending_lock:
            waiting = list(self._pending.values())
            self._pending.clear()
        for pending in waiting:
            pending.event.set()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._sock is not None
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            # Bounded: a guest that stops draining its port must not hang us.
            _, writable, _ = select.select([], [self._sock], [], 30)
            if not writable:
                raise self._fail("command channel is not writable")
            self._sock.sendall(data)

    def _request(self, msg: dict[str, Any], *, wait: float, during_boot: bool = False) -> dict[str, Any]:
        if self._sock is None:
            raise GuestError(f"guest {self.name} is not running")
        if self._closed_reason is not None:
            raise self._fail(self._closed_reason)
        rid = next(self._ids)
        pending = _Pending()
        with self._pending_lock:
            self._pending[rid] = pending
        try:
            self._send({**msg, "id": rid})
        except OSError as exc:
            raise self._fail(f"cannot send to agent: {exc}") from exc
        if not pending.event.wait(wait):
            with self._pending_lock:
                self._pending.pop(rid, None)
            if during_boot:
                raise TimeoutError
            raise self._fail(f"agent gave no answer to {msg.get('op')!r} within {wait:.0f}s")
        if pending.response is None:
            raise self._fail(self._closed_reason or "channel closed")
        if not pending.response.get("ok"):
            raise HarnessError(f"guest {self.name}: agent failed {msg.get('op')!r}: {pending.response.get('error')}")
        return pending.response

    def stop(self, timeout: float = 60.0) -> None:
        """Collect logs, power off cleanly, kill QEMU if that does not work."""
        if self._proc is None:
            self._terminate()
            return
        if self._proc.poll() is None and self._sock is not None and self._closed_reason is None:
            with contextlib.suppress(HarnessError):
                dmesg = self.run("dmesg", timeout=30, check=False)
                (self.log_dir / "dmesg.log").write_text(dmesg.stdout)
            try:
                self._request({"op": "shutdown"}, wait=30)
                self._note("shutdown requested")
            except HarnessError as exc:
                self._note(f"clean shutdown failed: {exc}")
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._note("guest did not power off in time; killing QEMU")
        self._terminate()

    def power_off(self) -> None:
        """Pull the plug: kill QEMU at once, as a node crash would (no sync)."""
        if self._proc is not None:
            self._note("power cut")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._terminate()

    def _terminate(self) -> None:
        if not self._active:
            return
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._console_thread is not None:
            self._console_thread.join(timeout=10)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._reader_thread is not None:
            self._reader_thread.join(timeout=10)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self.lab is not None:
            if self.lab.started:
                for tap in self._taps:
                    self.lab.delete_tap(tap)
            self.lab.detach(self)
        for path in self._owned_disks:
            path.unlink(missing_ok=True)
        self._note(f"stopped (exit status {proc.returncode if proc else None})")
        if self._harness_log is not None:
            self._harness_log.close()
            self._harness_log = None
        self._active = False
        self._proc = None
        self._sock = None
        self._sock_dir = None
        self._taps = []
        self._owned_disks = []
        self._closed_reason = None
        self._pending.clear()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands ----------------------------------------------------------

    def ping(self) -> float:
        """Round-trip time of one no-op request (measures the channel alone)."""
        t0 = time.monotonic()
        self._request({"op": "ping"}, wait=_CHANNEL_MARGIN_S)
        return time.monotonic() - t0

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float = 120.0,
        check: bool = True,
        input: str | bytes | None = None,  # same name as in subprocess.run
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Completed:
        """Run ``cmd`` as root in the guest (a string goes through /bin/sh).

        The guest kills the command's whole process group after ``timeout``
        seconds. With ``check`` a non-zero exit raises :class:`CommandError`
        and a timeout raises :class:`CommandTimeout`; without it the outcome
        is returned either way.
        """
        wire_cmd: str | list[str] = cmd if isinstance(cmd, str) else [str(c) for c in cmd]
        data = input.encode() if isinstance(input, str) else input
        req: dict[str, Any] = {"op": "run", "cmd": wire_cmd, "timeout": timeout}
        if data:
            req["input"] = base64.b64encode(data).decode()
        if env:
            req["env"] = dict(env)
        if cwd:
            req["cwd"] = cwd
        resp = self._request(req, wait=timeout + _CHANNEL_MARGIN_S)
        result = Completed(
            cmd=wire_cmd,
            rc=int(resp["rc"]),
            stdout=base64.b64decode(resp["stdout"]).decode(errors="replace"),
            stderr=base64.b64decode(resp["stderr"]).decode(errors="replace"),
            duration=float(resp.get("duration", 0.0)),
            timed_out=bool(resp.get("timed_out")),
        )
        self._note(
            f"run rc={result.rc} t={result.duration:.2f}s"
            f"{' TIMEOUT' if result.timed_out else ''}: {wire_cmd!r}"
            + (f"\n  stderr: {_tail(result.stderr, 500)!r}" if result.rc else "")
        )
        if check and result.timed_out:
            raise CommandTimeout(f"guest {self.name}: timed out after {timeout}s\n{result.describe()}", result)
        if check and result.rc != 0:
            raise CommandError(f"guest {self.name}: command failed\n{result.describe()}", result)
        return result

    def wait_until(self, cmd: str, *, timeout: float = 60.0, interval: float = 0.5) -> Completed:
        """Re-run ``cmd`` until it exits 0; raise :class:`HarnessError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            result = self.run(cmd, timeout=max(5.0, left), check=False)
            if result.rc == 0:
                return result
            if time.monotonic() >= deadline:
                raise HarnessError(f"guest {self.name}: condition not met in {timeout}s\n{result.describe()}")
            time.sleep(interval)

    def read_file(self, path: str) -> bytes:
        resp = self._request({"op": "read_file", "path": path}, wait=_CHANNEL_MARGIN_S)
        return base64.b64decode(resp["data"])

    def write_file(self, path: str, data: str | bytes, mode: int | None = None) -> None:
        """Create or replace a file in the guest (parents are created)."""
        raw = data.encode() if isinstance(data, str) else data
        req: dict[str, Any] = {
            "op": "write_file",
            "path": path,
            "data": base64.b64encode(raw).decode(),
        }
        if mode is not None:
            req["mode"] = mode
        self._request(req, wait=_CHANNEL_MARGIN_S)

    # -- background processes ---------------------------------------------

    def spawn(
        self,
        name: str,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        notify: bool = False,
    ) -> int:
        """Start a background process in the guest; returns its guest pid.

        Its stdout and stderr go to ``spawn_log_path(name)`` on the host, which
        stays readable after the guest died. With ``notify`` it gets a NOTIFY_SOCKET,
        as a Type=notify service does, for :meth:`wait_notify`.
        """
        if not _SAFE_NAME_RE.match(name):
            raise HarnessError(f"process name {name!r}: 1-20 of [A-Za-z0-9_-]")
        req: dict[str, Any] = {
            "op": "spawn",
            "name": name,
            "cmd": cmd if isinstance(cmd, str) else [str(c) for c in cmd],
            "log": f"{GUEST_SHARED_DIR}/logs/{name}.log",
        }
        if env:
            req["env"] = dict(env)
        if cwd:
            req["cwd"] = cwd
        if notify:
            req["notify"] = True
        resp = self._request(req, wait=_CHANNEL_MARGIN_S)
        self._note(f"spawn {name} pid={resp['pid']}: {cmd!r}")
        return int(resp["pid"])

    def wait_notify(self, name: str, state: str = "READY=1", timeout: float = 60.0) -> None:
        """Wait until spawned process ``name`` (started with ``notify``) sends ``state`` to
        its notify socket; raise :class:`HarnessError` if it exits or the time runs out."""
        resp = self._request(
            {"op": "wait_notify", "name": name, "state": state, "wait": timeout},
            wait=timeout + _CHANNEL_MARGIN_S,
        )
        if not resp["notified"]:
            how = "still running" if resp["rc"] is None else f"exited with status {resp['rc']}"
            tail = self.spawn_log(name)[-2000:]
            raise HarnessError(f"guest {self.name}: {name} sent no {state} in {timeout}s ({how})\n{tail}")
        self._note(f"{name} notified {state}")

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0, group: bool = True) -> int | None:
        """Signal a spawned process (and its group, unless not ``group``); wait up to ``timeout``.

        Returns its exit status, or None if it is still running.
        """
        resp = self._request(
            {"op": "kill", "name": name, "signal": int(sig), "wait": timeout, "group": group},
            wait=timeout + _CHANNEL_MARGIN_S,
        )
        self._note(f"kill {name} sig={int(sig)} -> rc={resp['rc']}")
        return None if resp["rc"] is None else int(resp["rc"])

    def wait_exit(self, name: str, timeout: float = 60.0) -> int:
        """Wait for a spawned process to end by itself; its exit status. Waited for in the
        agent (signal 0 disturbs nothing): polling with a command costs a process start."""
        rc = self.kill(name, 0, timeout=timeout)
        if rc is None:
            raise HarnessError(f"guest {self.name}: {name} still running after {timeout}s")
        return rc

    def status(self, name: str) -> int | None:
        """Exit status of a spawned process, or None while it runs."""
        resp = self._request({"op": "status", "name": name}, wait=_CHANNEL_MARGIN_S)
        return None if resp["rc"] is None else int(resp["rc"])

    def spawn_log_path(self, name: str) -> Path:
        return self.shared_dir / "logs" / f"{name}.log"

    def spawn_log(self, name: str) -> str:
        try:
            return self.spawn_log_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- devices -----------------------------------------------------------

    def disk_device(self, name: str) -> str:
        """Guest device node of extra disk ``name`` (e.g. /dev/vdb)."""
        disk = next((d for d in self.disks if d.name == name), None)
        if disk is None:
            raise HarnessError(f"guest {self.name} has no disk {name!r}")
        link = (
            f"/dev/disk/by-id/virtio-{name}"
            if disk.bus == "virtio"
            else f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{name}"
        )
        # udev (started by virtme-ng's init) makes the by-id links a moment
        # after the device appears.
        self.wait_until(f"test -b {shlex.quote(link)}", timeout=30)
        return self.run(["readlink", "-f", link]).stdout.strip()

    def set_link(self, up: bool, slot: int = 0) -> None:
        """Plug or pull the cable of NIC ``slot``: its tap goes up or down in the lab."""
        if self.lab is None or slot >= len(self._taps):
            raise HarnessError(f"{self.name} has no NIC {slot}")
        self.lab.run(["ip", "link", "set", "dev", self._taps[slot], "up" if up else "down"])

    def unplug_disk(self, name: str, timeout: float = 30.0) -> None:
        """Hot-unplug extra disk ``name`` through QMP, as pulling a drive out does.

        Returns once QEMU reports the device deleted. A SCSI disk goes at once; a
        virtio-blk (PCI) disk waits for the guest to acknowledge the ACPI eject.
        """
        disk = next((d for d in self.disks if d.name == name), None)
        if disk is None or self._sock_dir is None:
            raise HarnessError(f"guest {self.name} has no disk {name!r} plugged in")
        device = f"disk-{name}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
            qmp.settimeout(timeout)
            qmp.connect(str(self._sock_dir / "qmp.sock"))
            stream = qmp.makefile("rwb")

            def until(done: Any) -> dict[str, Any]:
                for line in stream:
                    message = json.loads(line)
                    if "error" in message:
                        raise HarnessError(f"QMP refused unplugging {device}: {message['error']}")
                    if done(message):
                        return message
                raise HarnessError(f"QMP closed while unplugging {device}")

            def execute(command: str, **arguments: Any) -> None:
                stream.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
                stream.flush()
                until(lambda message: "return" in message)

            until(lambda message: "QMP" in message)  # the greeting
            execute("qmp_capabilities")
            execute("device_del", id=device)
            until(lambda m: m.get("event") == "DEVICE_DELETED" and m.get("data", {}).get("device") == device)
        self.disks.remove(disk)
        self._note(f"unplugged disk {name}")

    def disk_image(self, name: str) -> Path:
        """Host path of the image behind extra disk ``name``."""
        return self._disk_paths[name]

    def _configure_nics(self) -> None:
        self.nic_names = []
        for mac, nic in zip(self.macs, self.nics, strict=True):
            script = f'for d in /sys/class/net/*; do [ "$(cat $d/address)" = {mac} ] && basename $d; done'
            ifname = self.wait_until(script + " | grep .", timeout=30).stdout.strip()
            self.run(["ip", "link", "set", "dev", ifname, "up"])
            if nic.address:
                self.run(["ip", "addr", "add", nic.address, "dev", ifname])
            self.nic_names.append(ifname)
            self._note(f"nic {ifname} mac={mac} bridge={nic.bridge} addr={nic.address}")

    # -- applianced prerequisites -----------------------------------------

    def setup_storage(self, modules: Iterable[str] = LIO_MODULES) -> None:
        """Load LIO, mount configfs, give /etc/target and /var/lib/applianced.

        Each directory gets a fresh tmpfs unless something (an ``rwdirs``
        share) is mounted there already: the guest's /etc and /var overlays
        would otherwise show whatever the host has in those paths. Safe to call
        again.
        """
        self.run(["modprobe", "-a", *modules])
        self.run("mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config")
        self.run("test -d /sys/kernel/config/target")
        for path in ("/etc/target", "/var/lib/applianced"):
            self.run(f"mkdir -p {path} && (mountpoint -q {path} || mount -t tmpfs -o mode=0700 tmpfs {path})")

    def start_dbus(self, policy_files: Iterable[Path | str] | None = None) -> None:
        """Start a system dbus-daemon with our bus policy installed.

        ``policy_files`` default to the project's policy if it exists; they are
        copied into /etc/dbus-1/system.d/ first, because dbus-daemon reads its
        policy at start.
        """
        if policy_files is None:
            policy_files = [DEFAULT_DBUS_POLICY] if DEFAULT_DBUS_POLICY.exists() else []
        for src in policy_files:
            src = Path(src)
            self.write_file(f"/etc/dbus-1/system.d/{src.name}", src.read_bytes(), mode=0o644)
        self.run("mkdir -p /run/dbus && rm -f /run/dbus/system_bus_socket /run/dbus/pid")
        # --nofork keeps it under spawn() so its log is captured and it is
        # stopped with the guest; --nosyslog because the guest has no syslog.
        self.spawn(
            "dbus-daemon",
            ["dbus-daemon", "--system", "--nofork", "--nopidfile", "--nosyslog"],
        )
        self.wait_until(
            "dbus-send --system --print-reply --dest=org.freedesktop.DBus "
            "/org/freedesktop/DBus org.freedesktop.DBus.GetId",
            timeout=60,
        )

    def start_iscsid(self, initiator_name: str) -> None:
        """Start open-iscsi's iscsid with the given initiator IQN."""
        self.write_file("/etc/iscsi/initiatorname.iscsi", f"InitiatorName={initiator_name}\n")
        self.run(["modprobe", "-a", "iscsi_tcp"])
        self.spawn("iscsid", ["iscsid", "-f"])
        # iscsiadm talks to iscsid over this abstract socket.
        self.wait_until("grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix", timeout=60)


def start_all(guests: Iterable[Guest]) -> None:
    """Boot several guests in parallel; on any failure stop them all."""
    guests = list(guests)
    try:
        for guest in guests:
            guest.launch()
        for guest in guests:
            guest.wait_ready()
    except BaseException:
        for guest in guests:
            with contextlib.suppress(Exception):
                guest.stop(timeout=10)
        raise


@contextlib.contextmanager
def running(guests: Iterable[Guest]) -> Iterator[list[Guest]]:
    """Context manager form of :func:`start_all` that always stops them."""
    guests = list(guests)
    start_all(guests)
    try:
        yield guests
    finally:
        for guest in guests:
            with contextlib.suppress(Exception):
                guest.stop()
