"""The Vagrant lab's failover scenario (vagrant/failover-scenario) run against QEMU guests
that stand in for the Vagrant machines: the script proven on a host without KVM.

The guests have the Vagrantfile's names and addresses, on two private bridges inside a
network namespace made for the run; the ping node is an address of the namespace itself,
as in tools/demo. The storage nodes run applianced as the Vagrantfile provisions them
(from this checkout, its portal on the first data address); the client runs open-iscsi
with the initiator name the Vagrantfile gives it. On the scenario's PATH, ``vagrant`` is
a stand-in that forwards each of its calls to this process over a Unix socket:

* ``vagrant ssh MACHINE --no-tty -c COMMAND`` runs COMMAND in the guest, as root
  (``sudo`` runs its arguments; the checkout's virtual environment is on PATH, where
  tools/install-node puts appliancectl), with the caller's standard input;
* ``vagrant halt --force MACHINE`` kills the guest's QEMU: a power cut, as libvirt's
  destroy is;
* ``vagrant up MACHINE --no-provision`` boots it again with its disk, its state and its
  MACs, and starts applianced, as systemd does on a Vagrant node.

    tools/rehearse-vagrant          # as root; everything is torn down at the end
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.vm.appliance import VENV_BIN, ApplianceNode
from tests.vm.harness import REPO_ROOT, Guest, Lab, Nic, check_platform, start_all
from tools.demo import Pair

MIB = 1 << 20
SPARE_DISK_SIZE = 128 * MIB  # the Vagrant nodes' is 4 GiB; the scenario writes half of it
SPARE_DISK = "/dev/disk/by-id/virtio-spare"
CLIENT_IQN = "iqn.2026-12.org.applianced.vagrant:client"  # as the Vagrantfile sets it
# The Vagrantfile's addresses: data network, then replication and heartbeat link.
NODES = {
    "node1": (("10.77.0.11", "52:54:00:77:00:11"), ("10.78.0.11", "52:54:00:78:00:11")),
    "node2": (("10.77.0.12", "52:54:00:77:00:12"), ("10.78.0.12", "52:54:00:78:00:12")),
}
CLIENT_ADDRESS = "10.77.0.21"
PING_NODE = "10.77.0.254"
# What a command of the scenario finds in a guest: root's sudo, install-node's appliancectl.
SHELL_PREFIX = f'export PATH={VENV_BIN}:$PATH; sudo() {{ "$@"; }}; '
SCENARIO_TIMEOUT = 3 * 3600


class Machines:
    """The guests standing in for the Vagrant machines, by name: the storage nodes of
    ``pair`` (tools/demo's, with the Vagrantfile's addresses) and the client."""

    def __init__(self, pair: Pair, guests: dict[str, Guest]) -> None:
        self.pair = pair
        self.guests = guests
        self._lock = threading.Lock()

    # -- what the stand-in forwards ----------------------------------------------------

    def vagrant(self, argv: list[str], stdin: bytes) -> tuple[int, str, str]:
        verb, machine = argv[0], next(arg for arg in argv[1:] if not arg.startswith("-"))
        if verb == "ssh":
            command = argv[argv.index("-c") + 1]
            done = self.guests[machine].run(
                ["bash", "-c", SHELL_PREFIX + command], input=stdin, check=False, timeout=SCENARIO_TIMEOUT
            )
            return done.rc, done.stdout, done.stderr
        if verb == "halt" and "--force" in argv:
            self.guests[machine].power_off()
            return 0, f"==> {machine}: powered off\n", ""
        if verb == "up":
            # Started by systemd on a Vagrant node; here as the demo starts a node again.
            node = self.pair.boot_again(machine)
            with self._lock:
                self.guests[machine] = node.guest
            return 0, f"==> {machine}: booted\n", ""
        return 2, "", f"rehearse-vagrant: no stand-in for: vagrant {shlex.join(argv)}\n"


def serve(machines: Machines, path: str) -> socketserver.UnixStreamServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = json.loads(self.rfile.readline())
            try:
                rc, out, err = machines.vagrant(request["argv"], base64.b64decode(request["stdin"]))
            except Exception as exc:  # the scenario sees the failure as the command's
                rc, out, err = 1, "", f"rehearse-vagrant: {exc!r}\n"
            self.wfile.write((json.dumps({"rc": rc, "stdout": out, "stderr": err}) + "\n").encode())

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def forward(path: str, argv: list[str]) -> int:
    """The ``vagrant`` stand-in: this call, sent to the rehearsal; its output and status."""
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(path)
        request = {"argv": argv, "stdin": base64.b64encode(stdin).decode()}
        connection.sendall((json.dumps(request) + "\n").encode())
        answer = json.loads(connection.makefile().readline())
    sys.stdout.write(answer["stdout"])
    sys.stderr.write(answer["stderr"])
    return answer["rc"]


def main() -> int:
    check_platform(need_network=True)
    logs = Path(tempfile.mkdtemp(prefix="applianced-rehearse-vagrant-"))
    started = time.monotonic()
    with Lab(bridges=("lan", "hb")) as lab:
        lab.add_address("lan", f"{PING_NODE}/24")
        pair = Pair(lab, logs, nics=NODES, disk=("spare", SPARE_DISK_SIZE))
        client = Guest("client", logs / "client", lab=lab, nics=[Nic("lan", f"{CLIENT_ADDRESS}/24")])
        machines = Machines(pair, {**{name: pair.guest(name) for name in NODES}, "client": client})
        print(f"rehearse-vagrant: booting node1, node2 and client (QEMU/TCG); logs in {logs}", flush=True)
        start_all(list(machines.guests.values()))
        try:
            for name in NODES:
                # What the Vagrantfile's provisioning leaves: applianced running, its portal.
                pair.node(name, machines.guests[name]).ctl("portal", "create", NODES[name][0][0])
            ApplianceNode(client).prepare(initiator_name=CLIENT_IQN)
            socket_path = str(logs / "vagrant.sock")
            server = serve(machines, socket_path)
            bin_dir = logs / "bin"
            bin_dir.mkdir()
            standin = bin_dir / "vagrant"
            standin.write_text(
                f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} forward {socket_path} "$@"\n'
            )
            standin.chmod(0o755)
            env = {
                **os.environ,
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "APPLIANCED_SRC": str(REPO_ROOT),
                "SPARE_DISK": SPARE_DISK,
            }
            scenario = REPO_ROOT / "vagrant" / "failover-scenario"
            done = subprocess.run([str(scenario)], env=env, stdin=subprocess.DEVNULL, timeout=SCENARIO_TIMEOUT)
            server.shutdown()
            return done.returncode
        finally:
            for guest in [client, *reversed(pair.guests)]:
                guest.stop()
            print(f"rehearse-vagrant: done in {time.monotonic() - started:.0f} s; guests stopped", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        sys.exit(forward(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
