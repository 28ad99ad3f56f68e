"""Benchmark: applying, restoring and re-checking a whole configuration, against targetctl.

What it measures, for N = 50, 100 and 200 targets (each with one 1 GiB sparse file-backed
LUN and one ACL; one portal 127.0.0.1:3260 shared by all targets), in ONE QEMU guest booted
by the project's VM harness (tests/vm/harness.py), side by side with Debian's targetctl:

* apply from empty: wall time of ``appliancectl config import FILE`` with the daemon
  running and LIO empty (``apply_cli``), and the D-Bus call alone (``apply_call``: from the
  ImportConfiguration call to its reply, time-stamped by ``dbus-monitor --profile``, so it
  leaves out the CLI's own Python start-up).
* restore after a wipe: daemon stopped (SIGTERM), ``targetctl clear``, daemon started:
  - ``total``: from the daemon's fork/exec to its ``READY=1`` (a launcher in the guest gives
    the daemon a NOTIFY_SOCKET and time-stamps the datagram, and every line the daemon
    logs, so ``reconciled`` marks the end of the engine's reconcile, ``started`` the end
    of the D-Bus object tree); Python start-up and imports included.
  - ``reconcile-only``: a Python snippet in the guest that builds the daemon's engine
    (``Appliance(LioKernel(), StateStore(...), local_addresses, NftFirewall())``) and times ``await
    start()`` alone, after its imports; the kernel and store are wrapped to split the time
    into open / observe / apply / state-file work.
* no-op restart: the same two measurements with LIO intact (the plan must be empty).
* baseline in the same guest: ``targetctl restore`` of a ``targetctl save`` of the very
  configuration applianced built (process wall time), the same restore in-process
  (``RTSRoot().restore_from_file`` timed after ``import rtslib_fb``), ``targetctl clear``
  with the configuration loaded, and a plain rtslib loop that creates exactly what
  applianced renders (same objects, attributes, parameters), run with Debian's
  python3-rtslib-fb and with the venv's rtslib-fb.

Daemon code is not touched: every number is taken from outside (launcher, wrapper
snippets, dbus-monitor, the harness agent's wall clock). Each build is checked by counting
targets, enabled TPGs, LUNs, mapped LUNs, backstores and portals in configfs.

Process wall times come from the guest agent (``Completed.duration``: fork to exit,
measured inside the guest); in-process times from ``time.monotonic()`` in the guest;
Python start-up from /proc/self/stat's start time against CLOCK_BOOTTIME.

Run as root from the checkout (the guest shares the host's root read-only):

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/config_apply.py \
        [--sizes 50,100,200] [--repeat 1] [--output bench/results-config-apply.json]

Nothing leaves the guest but the command channel; the only network use is LIO listening
on 127.0.0.1 inside it. The guest is stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.vm.appliance import VENV_BIN, ApplianceNode
from tests.vm.harness import REPO_ROOT, Guest

VENV_PY = str(VENV_BIN / "python")
APPLIANCECTL = str(VENV_BIN / "appliancectl")
DEBIAN_PY = "/usr/bin/python3"
TARGETCTL = "/usr/bin/targetctl"

GUEST_DIR = "/tmp/bench"
STATE_DIR = "/var/lib/applianced"
DISKS_DIR = f"{STATE_DIR}/disks"
NOTIFY_SOCKET = "/run/bench-notify.sock"
DISK_SIZE = 1 << 30
INITIATOR = "iqn.2026-11.org.applianced.bench:client{i}"
PORTAL = "127.0.0.1"
DAEMON = "applianced"
LONG = 1800.0  # seconds: one guest command may create hundreds of configfs objects under TCG

# -- scripts run inside the guest -------------------------------------------------------------

# Seconds since this process was forked: /proc/self/stat's start time is on CLOCK_BOOTTIME.
SINCE_START = """
import os as _os, time as _time
def since_start():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return _time.clock_gettime(_time.CLOCK_BOOTTIME) - int(fields[19]) / _os.sysconf("SC_CLK_TCK")
"""

# venv python: N disk files made by applianced's own diskfile.create, the export document,
# and the same configuration as rendered for LIO (for the plain rtslib loop).
GEN = r"""
import json, sys, uuid
from pathlib import Path
from applianced import names
from applianced.iscsi import diskfile
from applianced.constants import DEFAULT_IQN_PREFIX
from applianced.iscsi.kernel.model import render
from applianced.state import Acl, Config, Disk, Lun, Portal, Target

n, disk_dir, size = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
doc_path, spec_path, portal, initiator = sys.argv[4:8]
disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
disks, targets = {}, {}
for i in range(1, n + 1):
    name, tname = f"d{i:04d}", f"t{i:04d}"
    path = disk_dir / f"{name}.img"
    serial = str(uuid.uuid4())
    diskfile.create(path, diskfile.Marker(name=name, serial=serial, size=size))
    disks[name] = Disk(name=name, path=str(path), size=size, serial=serial)
    targets[tname] = Target(
        name=tname,
        iqn=names.generate_target_iqn(DEFAULT_IQN_PREFIX, tname),
        luns=(Lun(number=0, disk=name),),
        acls=(Acl(initiator=initiator.format(i=i)),),
    )
config = Config(node_id=str(uuid.uuid4()), disks=disks, targets=targets, portals=(Portal(address=portal, port=3260),))
# What `appliancectl config export` prints (engine.export_configuration).
doc = {"format": "applianced-configuration", **config.to_json()}
Path(doc_path).write_text(json.dumps(doc, indent=2, sort_keys=True))
kc = render(config)
spec = {
    "storage_objects": [
        {"name": so.name, "path": so.path, "size": so.size, "serial": so.serial, "write_back": so.write_back}
        for so in kc.storage_objects.values()
    ],
    "targets": [
        {
            "iqn": t.iqn,
            "enabled": t.enabled,
            "attributes": dict(t.attributes),
            "parameters": dict(t.parameters),
            "portals": sorted(t.portals),
            "luns": sorted(t.luns.items()),
            "acls": [
                {
                    "initiator": a.initiator,
                    "mapped": sorted((m.mapped_lun, m.tpg_lun, m.write_protect) for m in a.mapped_luns),
                }
                for a in t.acls.values()
            ],
        }
        for t in kc.targets.values()
    ],
}
Path(spec_path).write_text(json.dumps(spec))
print(json.dumps({"disks": len(disks), "targets": len(targets), "doc_bytes": Path(doc_path).stat().st_size}))
"""

# Debian python3, stdlib only: runs the daemon with a NOTIFY_SOCKET, time-stamps READY=1
# and each line the daemon logs, writes the timings to a file, then stays the daemon's
# parent (so the harness's spawn/kill manage both) and exits with its status.
LAUNCHER = r"""
import json, os, re, signal, socket, subprocess, sys, threading, time
label, sock_path, timing_path, *argv = sys.argv[1:]
try:
    os.unlink(sock_path)
except FileNotFoundError:
    pass
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sock_path)
print(f"=== launch {label}: {' '.join(argv)}", flush=True)
events = {}
seen_ready_line = threading.Event()
t0 = time.monotonic()
proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
                        env=dict(os.environ, NOTIFY_SOCKET=sock_path))
# The harness signals the whole process group: the daemon gets SIGTERM itself, and this
# launcher stays to collect its exit status.
signal.signal(signal.SIGTERM, lambda *_: None)

def pump():
    for raw in proc.stdout:
        t = time.monotonic() - t0
        line = raw.decode(errors="replace").rstrip("\n")
        print(f"[+{t:8.3f}s] {line}", flush=True)
        m = re.search(r"reconciled the kernel with (\d+) change", line)
        if m and "reconciled" not in events:
            events["reconciled"], events["changes"] = t, int(m.group(1))
        if "kernel reconciled at start-up" in line and "started" not in events:
            events["started"] = t
        if " ready on " in line:
            seen_ready_line.set()
    seen_ready_line.set()

pumper = threading.Thread(target=pump, daemon=True)
pumper.start()
result = {"label": label, "pid": proc.pid}
try:
    sock.settimeout(0.5)
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            if proc.poll() is not None:
                result["error"] = f"daemon exited with status {proc.returncode} before READY=1"
                break
            continue
        if b"READY=1" in data.split(b"\n"):
            result["ready"] = time.monotonic() - t0
            break
    seen_ready_line.wait(30)
    result.update(events)
finally:
    with open(timing_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(timing_path + ".tmp", timing_path)
sock.close()
sys.exit(proc.wait())
"""

# venv python: the daemon's engine alone; times start() after the imports. rtslib, which
# the daemon imports on its first removal, is imported here up front, so that start() is
# timed without imports (a restore or a no-op removes nothing).
RECONCILE = (
    SINCE_START
    + r"""
import asyncio, collections, json, sys, time
from pathlib import Path
from applianced import network
from applianced.iscsi import firewall
from applianced.engine import Appliance
from applianced.iscsi.kernel import configfs_actions, rtslib_actions
from applianced.iscsi.kernel.lio import LioKernel
from applianced.state import StateStore
imported = since_start()
spent = collections.defaultdict(float)
actions = collections.Counter()
per_action = collections.defaultdict(float)

def timed(key, fn, *args):
    t = time.monotonic()
    try:
        return fn(*args)
    finally:
        spent[key] += time.monotonic() - t

class TimedKernel(LioKernel):
    def open(self):
        return timed("open", super().open)
    def observe(self, *args):
        return timed("observe", super().observe, *args)
    def apply(self, plan):
        return timed("apply", super().apply, plan)

def timed_actions(backend):
    # Each action, timed by kind, inside the apply() call the engine makes.
    dispatch = backend.__dict__["_apply"]  # the singledispatchmethod itself
    def _apply(self, action):
        kind = type(action).__name__
        actions[kind] += 1
        t = time.monotonic()
        try:
            return dispatch.__get__(self, type(self))(action)
        finally:
            per_action[kind] += time.monotonic() - t
    backend._apply = _apply

timed_actions(configfs_actions.ConfigfsActions)
timed_actions(rtslib_actions.RtslibActions)

class TimedStore(StateStore):
    def load(self):
        return timed("state_load", super().load)
    def save(self, config):
        return timed("state_save", super().save, config)

async def main():
    store = TimedStore(Path(sys.argv[1]), "state.json")
    app = Appliance(TimedKernel(), store, network.local_addresses, firewall.NftFirewall())
    t = time.monotonic()
    changes = await app.start()
    return changes, time.monotonic() - t

changes, start_s = asyncio.run(main())
print(json.dumps({"imports": imported, "start": start_s, "changes": changes,
                  "parts": dict(spent), "actions": dict(actions), "per_action": dict(per_action)}))
"""
)

# Either python: a plain loop creating, with rtslib, what applianced renders for LIO.
RTSLIB_LOOP = (
    SINCE_START
    + r"""
import json, sys, time
import rtslib_fb as r
imported = since_start()
spec = json.load(open(sys.argv[1]))
t = time.monotonic()
fabric = r.FabricModule("iscsi")
sos = {}
for so in spec["storage_objects"]:
    sos[so["name"]] = r.FileIOStorageObject(so["name"], dev=so["path"], size=so["size"], wwn=so["serial"],
                                            write_back=so["write_back"])
backstores = time.monotonic() - t
for t_ in spec["targets"]:
    tpg = r.TPG(r.Target(fabric, t_["iqn"]), 1)
    for k, v in t_["attributes"].items():
        tpg.set_attribute(k, v)
    for k, v in t_["parameters"].items():
        tpg.set_parameter(k, v)
    for address, port in t_["portals"]:
        r.NetworkPortal(tpg, address, port)
    luns = {number: r.LUN(tpg, number, sos[name]) for number, name in t_["luns"]}
    for acl in t_["acls"]:
        node_acl = r.NodeACL(tpg, acl["initiator"])
        for mapped, tpg_lun, wp in acl["mapped"]:
            r.MappedLUN(node_acl, mapped, luns[tpg_lun], wp)
    tpg.enable = t_["enabled"]
print(json.dumps({"imports": imported, "run": time.monotonic() - t, "backstores": backstores}))
"""
)

# Debian python3: what targetctl restore does, timed after the import.
RTSLIB_RESTORE = (
    SINCE_START
    + r"""
import json, sys, time
import rtslib_fb
imported = since_start()
t = time.monotonic()
errors = rtslib_fb.RTSRoot().restore_from_file(restore_file=sys.argv[1])
print(json.dumps({"imports": imported, "run": time.monotonic() - t, "errors": list(errors or [])}))
"""
)

STARTUP_PROBE = (
    SINCE_START
    + r"""
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(since_start()))
"""
)

# Counts in configfs: targets, enabled TPGs, TPG LUNs, mapped LUNs, fileio backstores, portals.
VERIFY = r"""
cd /sys/kernel/config/target || exit 1
c() { ls -d "$@" 2>/dev/null | wc -l; }
echo $(c iscsi/iqn.*/tpgt_1) $(cat iscsi/iqn.*/tpgt_1/enable 2>/dev/null | grep -c 1) \
     $(c iscsi/iqn.*/tpgt_1/lun/lun_*) $(c iscsi/iqn.*/tpgt_1/acls/*/lun_*) \
     $(c core/fileio_*/*/) $(c iscsi/iqn.*/tpgt_1/np/*)
"""
VERIFY_FIELDS = ("targets", "enabled", "luns", "mapped_luns", "backstores", "portals")


class HostLoad:
    """CPU time used on the host by processes other than this benchmark and its guest.

    The machine may be shared (other test runs boot guests of their own), and a TCG guest
    slows down with every busy host core, so timed steps wait for a quiet host and record
    the load of other processes while they ran. Only processes are counted (their own time
    plus that of children they reaped): on these VMs /proc/stat also shows kernel time that
    belongs to no process and follows the guest's own activity, so "busy minus ours" would
    blame the benchmark's own load on others.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, threshold: float, max_wait: float) -> None:
        self.threshold = threshold
        self.max_wait = max_wait

    @staticmethod
    def _other_ticks() -> dict[int, int]:
        """CPU ticks of every process that is not this one or a descendant of it."""
        stats: dict[int, tuple[int, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is field 3 of proc(5): ppid is [1], utime..cstime are [11]..[14].
            stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        own, todo = set(), [os.getpid()]
        while todo:
            pid = todo.pop()
            if pid not in own:
                own.add(pid)
                todo.extend(children.get(pid, []))
        return {pid: ticks for pid, (_, ticks) in stats.items() if pid not in own}

    def snapshot(self) -> tuple[float, dict[int, int]]:
        return time.monotonic(), self._other_ticks()

    @classmethod
    def foreign_cores(cls, a: tuple[float, dict[int, int]], b: tuple[float, dict[int, int]]) -> float:
        # A process that exited in between is counted by the parent that reaped it; one that
        # started in between is counted whole.
        ticks = sum(max(0, t - a[1].get(pid, 0)) for pid, t in b[1].items())
        return ticks / cls.TICK / max(b[0] - a[0], 1e-3)

    def wait_quiet(self) -> tuple[float, float]:
        """Wait until other processes use less than ``threshold`` cores; (waited, load)."""
        start = time.monotonic()
        told = False
        while True:
            a = self.snapshot()
            time.sleep(1.0)
            load = self.foreign_cores(a, self.snapshot())
            waited = time.monotonic() - start
            if load < self.threshold or waited >= self.max_wait:
                if told:
                    log(f"  host quiet enough after {waited:.0f}s (other processes: {load:.2f} cores)")
                return waited, load
            if not told:
                log(f"  host busy: other processes use {load:.2f} cores; waiting (at most {self.max_wait:.0f}s)")
                told = True


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, guest: Guest, repeat: int, venv_loop: bool, load: HostLoad) -> None:
        self.guest = guest
        self.node = ApplianceNode(guest)
        self.repeat = repeat
        self.venv_loop = venv_loop
        self.load = load
        self.daemon_running = False
        # One record per timed step: how long it waited for a quiet host, the foreign load.
        self.contention: list[dict[str, Any]] = []
        self.current = ""

    # -- guest helpers ---------------------------------------------------------------------

    def run(self, cmd: str | list[str], timeout: float = LONG, **kw: Any):
        return self.guest.run(cmd, timeout=timeout, **kw)

    @contextlib.contextmanager
    def measured(self, label: str) -> Any:
        """Bracket one timed step: wait for a quiet host first, record the load during it."""
        waited, before = self.load.wait_quiet()
        a = self.load.snapshot()
        yield
        load = HostLoad.foreign_cores(a, self.load.snapshot())
        record = {
            "step": f"{self.current} {label}".strip(),
            "waited": waited,
            "foreign_cores_before": before,
            "foreign_cores": load,
        }
        self.contention.append(record)
        if load >= self.load.threshold:
            log(f"  warning: {record['step']} ran while other processes used {load:.2f} cores")

    def timed(self, cmd: list[str], label: str) -> float:
        """Wall time of one command in the guest, fork to exit (measured by the agent)."""
        with self.measured(label):
            return self.run(cmd).duration

    def json_of(self, cmd: list[str], label: str | None = None) -> Any:
        if label is None:
            return json.loads(self.run(cmd).stdout.strip().splitlines()[-1])
        with self.measured(label):
            return json.loads(self.run(cmd).stdout.strip().splitlines()[-1])

    def script(self, name: str) -> str:
        return f"{GUEST_DIR}/{name}.py"

    def install_scripts(self) -> None:
        for name, text in (
            ("gen", GEN),
            ("launcher", LAUNCHER),
            ("reconcile", RECONCILE),
            ("rtslib_loop", RTSLIB_LOOP),
            ("rtslib_restore", RTSLIB_RESTORE),
            ("startup_probe", STARTUP_PROBE),
        ):
            self.guest.write_file(self.script(name), text, mode=0o644)
        self.guest.write_file(f"{GUEST_DIR}/verify.sh", VERIFY, mode=0o755)

    def verify(self, n: int, what: str) -> dict[str, int]:
        counts = dict(
            zip(VERIFY_FIELDS, map(int, self.run(["sh", f"{GUEST_DIR}/verify.sh"]).stdout.split()), strict=True)
        )
        want = dict.fromkeys(VERIFY_FIELDS, n)
        if counts != want:
            raise RuntimeError(f"{what}: configfs holds {counts}, expected {n} of each")
        return counts

    def lio_empty(self) -> None:
        counts = self.run(["sh", f"{GUEST_DIR}/verify.sh"]).stdout.split()
        if any(int(c) for c in counts):
            raise RuntimeError(f"LIO is not empty: {counts}")

    def clear(self) -> float:
        seconds = self.timed([TARGETCTL, "clear"], "targetctl clear")
        self.lio_empty()
        return seconds

    # -- the daemon ------------------------------------------------------------------------

    def start_daemon(self, label: str) -> dict[str, Any]:
        """Start applianced under the launcher; return its timings (seconds from fork)."""
        timing = f"{GUEST_DIR}/ready.json"
        self.run(["rm", "-f", timing])
        with self.measured(f"daemon start ({label})"):
            self.guest.spawn(
                DAEMON,
                [DEBIAN_PY, "-I", self.script("launcher"), label, NOTIFY_SOCKET, timing, VENV_PY, "-m", "applianced"],
                cwd="/",
            )
            self.daemon_running = True
            self.run(f"while [ ! -s {timing} ]; do sleep 0.5; done")
        result = json.loads(self.guest.read_file(timing))
        if "error" in result:
            raise RuntimeError(f"applianced did not start ({label}): {result['error']}\n{self.node.log()[-3000:]}")
        return result

    def stop_daemon(self) -> None:
        if not self.daemon_running:
            return
        rc = self.guest.kill(DAEMON, signal.SIGTERM, timeout=120)
        self.daemon_running = False
        if rc != 0:
            raise RuntimeError(f"applianced exited with status {rc}\n{self.node.log()[-3000:]}")

    def reconcile_only(self) -> dict[str, Any]:
        return self.json_of([VENV_PY, self.script("reconcile"), STATE_DIR], "reconcile-only")

    # -- one size ----------------------------------------------------------------------------

    def reset(self) -> None:
        self.stop_daemon()
        self.run([TARGETCTL, "clear"])
        self.run(f"rm -rf {STATE_DIR}/state.json {DISKS_DIR} {GUEST_DIR}/*.json")
        self.lio_empty()

    def size(self, n: int) -> dict[str, Any]:
        r: dict[str, Any] = {"n": n}
        self.current = f"N={n}"
        doc, spec, saved = f"{GUEST_DIR}/export-{n}.json", f"{GUEST_DIR}/spec-{n}.json", f"{GUEST_DIR}/lio-{n}.json"
        self.reset()
        log(f"N={n}: creating {n} disk files and the export document")
        r["generate"] = self.json_of(
            [VENV_PY, self.script("gen"), str(n), DISKS_DIR, str(DISK_SIZE), doc, spec, PORTAL, INITIATOR]
        )

        # Apply from empty, daemon running, LIO empty.
        r["start_empty"] = self.start_daemon(f"N={n} empty")
        monitor = f"dbusmon-{n}"
        self.guest.spawn(
            monitor,
            [
                "dbus-monitor",
                "--system",
                "--profile",
                "type='method_call',destination='org.applianced.Appliance1'",
                "type='method_return'",
                "type='error'",
            ],
        )
        # dbus-monitor prints NameLost for its own name once it has become a monitor.
        self.guest.wait_until(f"grep -q NameLost {self.guest_log(monitor)}", timeout=300)
        # A CLI call that does no work: the CLI's own start-up and connection cost.
        r["status_empty_cli"] = self.timed([APPLIANCECTL, "status"], "appliancectl status")
        log(f"N={n}: appliancectl config import")
        r["apply_cli"] = self.timed([APPLIANCECTL, "config", "import", doc], "appliancectl config import")
        self.guest.kill(monitor, signal.SIGTERM, timeout=30)
        r["apply_call"] = import_call_seconds(self.guest.spawn_log(monitor))
        self.verify(n, "after config import")
        self.run([TARGETCTL, "save", saved])
        log(f"N={n}: apply {r['apply_cli']:.1f}s (D-Bus call {fmt(r['apply_call'])}s)")

        # No-op restart: LIO intact.
        r["noop_total"], r["noop_reconcile"] = [], []
        for i in range(self.repeat):
            self.stop_daemon()
            t = self.start_daemon(f"N={n} no-op {i}")
            check_changes(t.get("changes"), 0, "no-op restart")
            r["noop_total"].append(t)
        self.stop_daemon()
        for _ in range(self.repeat):
            t = self.reconcile_only()
            check_changes(t["changes"], 0, "no-op reconcile")
            r["noop_reconcile"].append(t)
        log(f"N={n}: no-op total {r['noop_total'][0]['ready']:.1f}s, reconcile {r['noop_reconcile'][0]['start']:.2f}s")

        # Restore after a wipe of the kernel configuration.
        r["restore_total"], r["restore_reconcile"], r["targetctl_clear"] = [], [], []
        for i in range(self.repeat):
            r["targetctl_clear"].append(self.clear())
            t = self.start_daemon(f"N={n} restore {i}")
            self.verify(n, "after daemon restore")
            r["restore_total"].append(t)
            self.stop_daemon()
        for _ in range(self.repeat):
            r["targetctl_clear"].append(self.clear())
            t = self.reconcile_only()
            self.verify(n, "after reconcile-only restore")
            r["restore_reconcile"].append(t)
        changes = r["restore_reconcile"][0]["changes"]
        log(
            f"N={n}: restore total {r['restore_total'][0]['ready']:.1f}s, "
            f"reconcile {r['restore_reconcile'][0]['start']:.1f}s ({changes} changes)"
        )

        # Baseline: targetctl and rtslib, same objects, same guest.
        r["targetctl_restore"], r["rtslib_restore"], r["rtslib_loop_debian"], r["rtslib_loop_venv"] = [], [], [], []
        for _ in range(self.repeat):
            r["targetctl_clear"].append(self.clear())
            r["targetctl_restore"].append(self.timed([TARGETCTL, "restore", saved], "targetctl restore"))
            self.verify(n, "after targetctl restore")
        log(f"N={n}: targetctl restore {r['targetctl_restore'][0]:.1f}s")
        for _ in range(self.repeat):
            r["targetctl_clear"].append(self.clear())
            res = self.json_of([DEBIAN_PY, self.script("rtslib_restore"), saved], "restore_from_file")
            if res["errors"]:
                raise RuntimeError(f"restore_from_file errors: {res['errors'][:5]}")
            r["rtslib_restore"].append(res)
            self.verify(n, "after in-process restore_from_file")
        loops = [("rtslib_loop_debian", DEBIAN_PY)] + ([("rtslib_loop_venv", VENV_PY)] if self.venv_loop else [])
        for key, python in loops:
            for _ in range(self.repeat):
                r["targetctl_clear"].append(self.clear())
                res = self.json_of([python, self.script("rtslib_loop"), spec], key)
                self.verify(n, f"after {key}")
                r[key].append(res)
        log(f"N={n}: rtslib loop (Debian) {r['rtslib_loop_debian'][0]['run']:.1f}s")
        # Finally check that applianced sees the loop's objects as its own configuration.
        t = self.reconcile_only()
        r["reconcile_after_loop_changes"] = t["changes"]
        self.reset()
        return r

    def guest_log(self, name: str) -> str:
        return f"/run/harness/logs/{name}.log"

    def startup_costs(self) -> dict[str, float]:
        """Interpreter start-up plus imports (run last, when the files have been read before)."""
        probes = {
            "debian_python": [DEBIAN_PY],
            "debian_python+rtslib_fb": [DEBIAN_PY, "rtslib_fb"],
            "venv_python": [VENV_PY],
            "venv_python+applianced.daemon": [VENV_PY, "applianced.daemon"],
            "venv_python+applianced.cli.main": [VENV_PY, "applianced.cli.main"],
            "venv_python+pyroute2": [VENV_PY, "pyroute2"],
        }
        return {
            key: self.json_of([python, self.script("startup_probe"), *modules], f"start-up {key}")
            for key, (python, *modules) in probes.items()
        }


def check_changes(got: int | None, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: {got} kernel change(s), expected {want}")


def import_call_seconds(monitor_log: str) -> float | None:
    """ImportConfiguration call to its reply, from ``dbus-monitor --profile`` lines.

    Fields: type, time stamp, serial, sender, destination, then path, interface and member
    for a call ("mc"), or the serial answered for a return ("mr") or an error ("err").
    """
    calls: dict[tuple[str, str], float] = {}
    for line in monitor_log.splitlines():
        f = line.split("\t")
        if len(f) < 6 or f[0] not in ("mc", "mr", "err"):
            continue
        stamp = float(f[1])
        if f[0] == "mc" and f[-1] == "ImportConfiguration":
            calls[(f[3], f[2])] = stamp
        elif f[0] in ("mr", "err") and (f[4], f[-1]) in calls:
            if f[0] == "err":
                raise RuntimeError(f"ImportConfiguration failed: {line}")
            return stamp - calls[(f[4], f[-1])]
    return None


# -- summary -------------------------------------------------------------------------------


def summarize(r: dict[str, Any], contention: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of every measurement of one size, in seconds."""
    steps = [c for c in contention if c["step"].startswith(f"N={r['n']} ")]

    def med(key: str, field: str | None = None) -> float | None:
        values = r.get(key) or []
        return median([v.get(field) if field else v for v in values]) if values else None

    s = {
        "n": r["n"],
        "apply_cli": r.get("apply_cli"),
        "apply_call": r.get("apply_call"),
        "cli_noop_call": r.get("status_empty_cli"),
        "start_empty_total": (r.get("start_empty") or {}).get("ready"),
        "restore_reconcile": med("restore_reconcile", "start"),
        "restore_total": med("restore_total", "ready"),
        "restore_total_reconciled": med("restore_total", "reconciled"),
        "restore_total_started": med("restore_total", "started"),
        "noop_reconcile": med("noop_reconcile", "start"),
        "noop_total": med("noop_total", "ready"),
        "noop_total_reconciled": med("noop_total", "reconciled"),
        "targetctl_restore": med("targetctl_restore"),
        "targetctl_clear": med("targetctl_clear"),
        "rtslib_restore_inprocess": med("rtslib_restore", "run"),
        "rtslib_loop_debian": med("rtslib_loop_debian", "run"),
        "rtslib_loop_venv": med("rtslib_loop_venv", "run"),
        "host_foreign_cores_max": max((c["foreign_cores"] for c in steps), default=None),
    }
    for part in ("open", "observe", "apply", "state_load", "state_save"):
        s[f"restore_reconcile_{part}"] = median([t["parts"].get(part, 0.0) for t in r.get("restore_reconcile", [])])
        s[f"noop_reconcile_{part}"] = median([t["parts"].get(part, 0.0) for t in r.get("noop_reconcile", [])])

    def ratio(a: str, b: str) -> float | None:
        return s[a] / s[b] if s.get(a) and s.get(b) else None

    s["ratio_restore_total/targetctl_restore"] = ratio("restore_total", "targetctl_restore")
    s["ratio_restore_reconcile/targetctl_restore"] = ratio("restore_reconcile", "targetctl_restore")
    s["ratio_restore_reconcile/rtslib_restore_inprocess"] = ratio("restore_reconcile", "rtslib_restore_inprocess")
    s["ratio_restore_reconcile/rtslib_loop_debian"] = ratio("restore_reconcile", "rtslib_loop_debian")
    s["ratio_rtslib_loop_debian/targetctl_restore"] = ratio("rtslib_loop_debian", "targetctl_restore")
    s["ratio_apply_cli/targetctl_restore"] = ratio("apply_cli", "targetctl_restore")
    return s


COLUMNS = [
    ("ours apply (CLI)", "apply_cli"),
    ("ours apply (D-Bus call)", "apply_call"),
    ("ours restore, reconcile-only", "restore_reconcile"),
    ("ours restore, total (fork→READY)", "restore_total"),
    ("ours no-op, reconcile-only", "noop_reconcile"),
    ("ours no-op, total (fork→READY)", "noop_total"),
    ("targetctl restore", "targetctl_restore"),
    ("rtslib restore_from_file, in-process", "rtslib_restore_inprocess"),
    ("targetctl clear", "targetctl_clear"),
    ("plain rtslib loop, Debian rtslib", "rtslib_loop_debian"),
    ("plain rtslib loop, venv rtslib", "rtslib_loop_venv"),
]
RATIOS = [
    ("ours restore total / targetctl restore", "ratio_restore_total/targetctl_restore"),
    ("ours restore reconcile-only / targetctl restore", "ratio_restore_reconcile/targetctl_restore"),
    ("ours restore reconcile-only / restore_from_file in-process", "ratio_restore_reconcile/rtslib_restore_inprocess"),
    ("ours restore reconcile-only / plain rtslib loop (Debian)", "ratio_restore_reconcile/rtslib_loop_debian"),
    ("plain rtslib loop (Debian) / targetctl restore", "ratio_rtslib_loop_debian/targetctl_restore"),
]


def table(summaries: list[dict[str, Any]]) -> str:
    sizes = [s["n"] for s in summaries]
    steps = list(itertools.pairwise(sizes))
    head = (
        "| measurement | "
        + " | ".join(f"N={n} s" for n in sizes)
        + " | "
        + " | ".join(f"N={n} ms/target" for n in sizes)
        + "".join(f" | {a}→{b} marginal ms/target" for a, b in steps)
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 2 * len(sizes) + len(steps))]
    for label, key in COLUMNS:
        secs = [s.get(key) for s in summaries]
        per = [None if v is None else 1000 * v / s["n"] for v, s in zip(secs, summaries, strict=True)]
        # The cost of one more target, without the fixed costs (start-up, imports).
        marginal = [
            None if a is None or b is None else 1000 * (b - a) / (m - n)
            for (n, m), (a, b) in zip(steps, itertools.pairwise(secs), strict=True)
        ]
        lines.append(
            f"| {label} | "
            + " | ".join("-" if v is None else f"{v:.2f}" for v in secs)
            + " | "
            + " | ".join("-" if v is None else f"{v:.1f}" for v in per)
            + "".join(" | -" if v is None else f" | {v:.1f}" for v in marginal)
            + " |"
        )
    lines.append(
        "| other host processes, max over timed steps (cores) | "
        + " | ".join(fmt(s.get("host_foreign_cores_max")) for s in summaries)
        + " |"
        + " |" * (len(sizes) + len(steps))
    )
    lines.append("")
    lines.append("| ratio | " + " | ".join(f"N={n}" for n in sizes) + " |")
    lines.append("|" + "---|" * (1 + len(sizes)))
    for label, key in RATIOS:
        lines.append(
            f"| {label} | " + " | ".join("-" if s.get(key) is None else f"{s[key]:.2f}" for s in summaries) + " |"
        )
    return "\n".join(lines)


def breakdown(summaries: list[dict[str, Any]], startup: dict[str, float]) -> str:
    lines = ["Where the time goes (medians, seconds):"]
    for s in summaries:
        state_file = (s["restore_reconcile_state_load"] or 0) + (s["restore_reconcile_state_save"] or 0)
        lines.append(
            f"  N={s['n']}: restore reconcile-only {fmt(s['restore_reconcile'])}"
            f" = open {fmt(s['restore_reconcile_open'])}"
            f" + observe {fmt(s['restore_reconcile_observe'])} + apply {fmt(s['restore_reconcile_apply'])}"
            f" + state file {fmt(state_file)}"
            f" + plan/other; no-op {fmt(s['noop_reconcile'])} (observe {fmt(s['noop_reconcile_observe'])})"
        )
        lines.append(
            f"        daemon restore: reconciled at +{fmt(s['restore_total_reconciled'])}, D-Bus tree built at"
            f" +{fmt(s['restore_total_started'])}, READY at +{fmt(s['restore_total'])};"
            f" daemon start with an empty state: {fmt(s['start_empty_total'])};"
            f" no-op CLI call {fmt(s['cli_noop_call'])}"
        )
    lines.append("  interpreter start-up + imports: " + ", ".join(f"{k} {v:.2f}" for k, v in startup.items()))
    return "\n".join(lines)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def machine_info(guest: Guest, started: float) -> dict[str, Any]:
    def host(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=30).stdout.strip()
        except OSError:
            return ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "host_cpu_model": cpu,
        "host_kernel": platform.release(),
        "accelerator": "QEMU TCG (no KVM)",
        "guest_kernel": guest.run(["uname", "-r"]).stdout.strip(),
        "guest_memory": guest.memory,
        "guest_cpus": guest.cpus,
        "guest_boot_seconds": guest.boot_seconds,
        # The guest runs the host's root file system, so the host's packages are the guest's.
        "rtslib_debian": host(["dpkg-query", "-W", "-f", "${Version}", "python3-rtslib-fb"]),
        "rtslib_venv": host([VENV_PY, "-c", "import importlib.metadata as m; print(m.version('rtslib-fb'))"]),
        "python_debian": host([DEBIAN_PY, "-c", "import platform; print(platform.python_version())"]),
        "python_venv": host([VENV_PY, "-c", "import platform; print(platform.python_version())"]),
        "git_head": host(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty_files": host(["git", "status", "--porcelain", "--untracked-files=no"]).splitlines(),
        "started_epoch": started,
    }


def compile_sources() -> None:
    """Compile applianced's modules to bytecode, as installing the package does.

    The guest runs the checkout, which it cannot write: without bytecode every process
    compiles applianced again, which a node never does. The .pyc files land in the
    checkout's __pycache__ directories (git-ignored); Python ignores them once a source
    changes.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([VENV_PY, "-m", "compileall", "-q", str(REPO_ROOT / "applianced")], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100,200", help="comma-separated target counts (default 50,100,200)")
    parser.add_argument("--repeat", type=int, default=1, help="samples of each measurement per size (median kept)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results-config-apply.json")
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="guest logs (default test-logs/bench-config-apply-*)"
    )
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--no-venv-loop", action="store_true", help="skip the rtslib loop with the venv's rtslib")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="a timed step starts only when other host processes use fewer cores than this (default 0.25)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=1200, help="longest wait for a quiet host before each timed step (s)"
    )
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    log_dir = args.log_dir or REPO_ROOT / "test-logs" / time.strftime("bench-config-apply-%Y%m%d-%H%M%S")

    started = time.time()
    guest = Guest("bench", log_dir, memory=args.memory, cpus=args.cpus)
    results: dict[str, Any] = {"sizes": [], "summary": [], "contention": []}
    bench = Bench(guest, args.repeat, not args.no_venv_loop, HostLoad(args.quiet_threshold, args.quiet_wait))

    def save() -> None:
        results["total_seconds"] = time.time() - started
        results["contention"] = bench.contention
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    compile_sources()
    try:
        log(f"booting the guest (logs: {log_dir})")
        guest.start()
        bench.node.prepare()
        guest.run("ip link set lo up")
        guest.run(f"mkdir -p {GUEST_DIR}")
        bench.install_scripts()
        results["machine"] = machine_info(guest, started)
        log(f"guest up in {guest.boot_seconds:.1f}s")
        for n in sizes:
            raw = bench.size(n)
            results["sizes"].append(raw)
            results["summary"].append(summarize(raw, bench.contention))
            save()
            print(table(results["summary"]), flush=True)
        log("measuring interpreter start-up")
        bench.current = ""
        results["startup"] = bench.startup_costs()
    except BaseException:
        log(f"benchmark failed; guest logs in {log_dir}")
        raise
    finally:
        with contextlib.suppress(Exception):
            guest.stop()
        if results["summary"] or results.get("machine"):
            save()
    log(f"done in {time.time() - started:.0f}s; results in {args.output}")
    print()
    print(table(results["summary"]))
    print()
    print(breakdown(results["summary"], results.get("startup", {})))
    busy = [c for c in bench.contention if c["foreign_cores"] >= args.quiet_threshold]
    waited = sum(c["waited"] for c in bench.contention)
    print(
        f"\nHost contention: {len(busy)} of {len(bench.contention)} timed steps ran while other processes used"
        f" >= {args.quiet_threshold} cores; {waited:.0f}s spent waiting for a quiet host."
    )
    for c in busy:
        print(f"  {c['step']}: {c['foreign_cores']:.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
