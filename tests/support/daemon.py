"""Starting and stopping applianced (with the in-memory kernel) and running appliancectl.

Readiness is taken from the daemon's own sd_notify message, through a NOTIFY_SOCKET the
test binds, so the test also proves that the daemon speaks the protocol systemd expects.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "appliancectl"
INITIATOR = "iqn.1994-05.com.redhat:client1"
# The first slice of a node's configuration, as appliancectl commands.
FIRST_SLICE = (
    ("disk", "create", "d1", "64M"),
    ("target", "create", "t1"),
    ("portal", "create", "127.0.0.1"),
    ("lun", "add", "t1", "d1"),
    ("acl", "add", "t1", INITIATOR),
)


def free_udp_port() -> int:
    """A UDP port that nothing on loopback uses now, for a peer link kept on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


class Daemon:
    """One node: a state directory and a kernel file that survive daemon restarts."""

    def __init__(
        self,
        bus_address: str,
        directory: Path,
        extra_env: dict[str, str] | None = None,
        exec_prefix: list[str] | None = None,
    ) -> None:
        self.bus_address = bus_address
        self.state_dir = directory / "state"
        self.kernel_file = directory / "kernel.json"
        self.log_file = directory / "applianced.log"
        self.extra_env = extra_env or {}
        # e.g. ["ip", "netns", "exec", NAME]: run the daemon inside a test's namespace.
        self.exec_prefix = exec_prefix or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def kernel_log(self) -> list[str]:
        path = self.kernel_file.with_suffix(".log")
        return path.read_text().split() if path.exists() else []

    def start(self, timeout: float = 20) -> None:
        with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify_path = os.path.join(tmp, "notify")
            notify.bind(notify_path)
            notify.settimeout(timeout)
            env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address, "NOTIFY_SOCKET": notify_path}
            env.pop("JOURNAL_STREAM", None)
            env.update(self.extra_env)
            log = self.log_file.open("ab")
            self.process = subprocess.Popen(
                [
                    *self.exec_prefix,
                    sys.executable,
                    "-m",
                    "tests.support.run_daemon",
                    str(self.kernel_file),
                    "--state-dir",
                    str(self.state_dir),
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=log,
            )
            try:
                while b"READY=1" not in notify.recv(4096):
                    pass
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"applianced did not become ready:\n{self.log_text()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=20)
        self.process = None
        return code

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def configure_first_slice(self) -> None:
        for args in FIRST_SLICE:
            result = self.cli(*args)
            assert result.returncode == 0, (args, result.stderr)

    def cli(self, *args: str, user: str | None = None, input: str | None = None) -> Result:
        command = [str(CLI), *args]
        if user:
            command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, cwd="/", input=input or "")
        return Result(done.returncode, done.stdout, done.stderr)
