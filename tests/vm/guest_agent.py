"""Command agent that runs inside a test VM and serves the host harness.

``tests/vm/harness.py`` boots a guest with virtme-ng and starts this script as
the guest's ``--exec`` command. It then answers JSON-line requests that the
host sends over a virtio-serial port (``/dev/virtio-ports/<name>``): run a
command, start/stop a background process, read/write a file, shut down. When
this script exits, virtme-ng's init powers the guest off, so ``shutdown`` is a
clean poweroff.

It uses the standard library only, because it must run with whatever Python
the guest sees (the guest shares the host's root file system read-only).

Protocol: every request is one JSON object on one line with an integer ``id``
and an ``op``; every response is one JSON object on one line echoing the ``id``
with ``ok`` true (plus op-specific fields) or ``ok`` false and ``error``.
Binary payloads (stdin, stdout, stderr, file contents) travel as base64.
Requests are served concurrently (one thread each), so a long command does not
block the channel.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

# How long a child gets between SIGTERM and SIGKILL when the agent shuts down.
_SHUTDOWN_GRACE_S = 5.0
# Where the sd_notify sockets of spawned processes live (guest tmpfs).
_NOTIFY_DIR = "/run/guest-agent"
# How often a wait for a notification looks whether the process is still alive.
_NOTIFY_POLL_S = 0.5


def _log(msg: str) -> None:
    # stderr is wired by virtme-ng to the host's console log, so it is the
    # place where a host-side failure can be diagnosed from.
    sys.stderr.write(f"guest-agent: {msg}\n")
    sys.stderr.flush()


def _b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _argv(cmd: str | list[str]) -> list[str]:
    # A string is a shell command line (pipes, redirections); a list is an argv
    # that must not be re-parsed by a shell.
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    return [str(a) for a in cmd]


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # Children run in their own session, so the whole tree (e.g. a shell and
    # what it started) is signalled, not just the direct child.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


class Agent:
    """Serves requests read from one virtio-serial port."""

    def __init__(self, port: str, log_dir: str, orphan_timeout: float) -> None:
        self.port = port
        self.log_dir = log_dir
        self.orphan_timeout = orphan_timeout
        self.fd = -1
        self.write_lock = threading.Lock()
        self.procs_lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.notify_sockets: dict[str, socket.socket] = {}

    # -- transport ---------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    # The host side is not connected: nobody is waiting for
                    # this answer any more, and the host retries what it needs.
                    _log(f"dropping response {msg.get('id')}: {exc}")
                    return
                view = view[n:]

    def serve(self) -> None:
        self.fd = os.open(self.port, os.O_RDWR)
        _log(f"serving on {self.port}")
        buf = b""
        served = False
        lost_since: float | None = None
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except InterruptedError:
                continue
            if not chunk:
                # virtio-serial returns EOF while no host client is connected;
                # drop any half line so a reconnecting host starts clean.
                buf = b""
                now = time.monotonic()
                lost_since = lost_since or now
                if served and now - lost_since > self.orphan_timeout:
                    # The host process died without stopping us (SIGKILL, CI
                    # timeout): power off rather than run forever as an orphan.
                    _log(f"host gone for {self.orphan_timeout:.0f}s, powering off")
                    os._exit(1)
                time.sleep(0.05)
                continue
            served = True
            lost_since = None
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self.dispatch(line)

    def dispatch(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            rid = req["id"]
            op = req["op"]
        except (ValueError, KeyError, TypeError):
            # Garbage from a host that reconnected mid-line; the host retries.
            _log(f"ignoring malformed request {line[:80]!r}")
            return
        threading.Thread(target=self.handle, args=(rid, op, req), daemon=True).start()

    def handle(self, rid: int, op: str, req: dict[str, Any]) -> None:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            self.send({"id": rid, "ok": False, "error": f"unknown op {op!r}"})
            return
        try:
            result = handler(req)
        except Exception as exc:  # every failure goes back to the host
            self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        result.update(id=rid, ok=True)
        self.send(result)
        if op == "shutdown":
            # The main thread is blocked in read(); leaving the process from
            # here is what makes virtme-ng's init power the guest off.
            _log("shutdown requested")
            os._exit(0)

    # -- operations --------------------------------------------------------

    def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {"uname": os.uname().release, "uptime": uptime, "pid": os.getpid()}

    def op_run(self, req: dict[str, Any]) -> dict[str, Any]:
        timeout = req.get("timeout")
        start = time.monotonic()
        proc = subprocess.Popen(
            _argv(req["cmd"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(req.get("env")),
            cwd=req.get("cwd") or "/",
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(_unb64(req.get("input")), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGKILL)
            # Bounded: a grandchild that escaped the group and keeps the pipes
            # open must not hang the agent.
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                out, err = b"", b""
                proc.kill()
                proc.wait()
        return {
            "rc": proc.returncode,
            "stdout": _b64(out),
            "stderr": _b64(err),
            "timed_out": timed_out,
            "duration": time.monotonic() - start,
        }

    def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req["name"]
        with self.procs_lock:
            old = self.procs.get(name)
            if old is not None and old.poll() is None:
                raise RuntimeError(f"process {name!r} is already running (pid {old.pid})")
            log_path = req.get("log") or os.path.join(self.log_dir, f"{name}.log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            env = dict(req.get("env") or {})
            if req.get("notify"):
                env["NOTIFY_SOCKET"] = self._notify_socket(name)
            # Line-buffered by the child or not, everything lands in one file
            # that the host can read even after the guest died.
            with open(log_path, "ab", buffering=0) as log:
                proc = subprocess.Popen(
                    _argv(req["cmd"]),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_env(env),
                    cwd=req.get("cwd") or "/",
                    start_new_session=True,
                )
            self.procs[name] = proc
        return {"pid": proc.pid, "log": log_path}

    def _notify_socket(self, name: str) -> str:
        """A fresh sd_notify socket for process ``name``, as systemd makes for a Type=notify
        unit; what an earlier process of that name sent is gone with the old socket."""
        old = self.notify_sockets.pop(name, None)
        if old is not None:
            old.close()
        os.makedirs(_NOTIFY_DIR, exist_ok=True)
        path = os.path.join(_NOTIFY_DIR, f"{name}.notify")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        # Credentials tell the process's own messages from its children's (NotifyAccess=main).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_sockets[name] = sock
        return path

    def op_wait_notify(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until process ``name`` itself sends the line ``state`` (e.g. READY=1) to its
        notify socket, it exits, or ``wait`` seconds pass; costs the guest nothing meanwhile,
        where polling with a command costs a process start each time."""
        proc = self._proc(req["name"])
        sock = self.notify_sockets[req["name"]]
        deadline = time.monotonic() + float(req["wait"])
        creds = struct.calcsize("3i")
        while True:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                return {"notified": False, "rc": proc.poll()}
            sock.settimeout(min(_NOTIFY_POLL_S, left))
            try:
                data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            senders = [
                struct.unpack("3i", raw[:creds])[0] for _, kind, raw in ancillary if kind == socket.SCM_CREDENTIALS
            ]
            if proc.pid in senders and req["state"] in data.decode(errors="replace").splitlines():
                return {"notified": True, "rc": None}

    def _proc(self, name: str) -> subprocess.Popen[bytes]:
        with self.procs_lock:
            proc = self.procs.get(name)
        if proc is None:
            raise KeyError(f"no process named {name!r}")
        return proc

    def op_kill(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req["name"])
        sig = int(req.get("signal", signal.SIGTERM))
        if proc.poll() is None:
            if req.get("group", True):
                _kill_group(proc, sig)
            else:
                proc.send_signal(sig)
        wait = req.get("wait")
        if wait is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=float(wait))
        return {"rc": proc.poll(), "pid": proc.pid}

    def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req["name"])
        return {"rc": proc.poll(), "pid": proc.pid}

    def op_read_file(self, req: dict[str, Any]) -> dict[str, Any]:
        with open(req["path"], "rb") as f:
            return {"data": _b64(f.read())}

    def op_write_file(self, req: dict[str, Any]) -> dict[str, Any]:
        path = req["path"]
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        with open(path, "wb") as f:
            f.write(_unb64(req.get("data")))
        if "mode" in req:
            os.chmod(path, int(req["mode"]))
        return {}

    def op_shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.procs_lock:
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
        # Flush guest page cache to the extra disks before the power goes.
        os.sync()
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", required=True, help="virtio-serial device to serve")
    parser.add_argument("--log-dir", default="/tmp", help="default directory for spawn logs")
    parser.add_argument(
        "--orphan-timeout", type=float, default=30.0, help="power off after the host is gone this many seconds"
    )
    args = parser.parse_args()
    agent = Agent(args.port, args.log_dir, args.orphan_timeout)
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
