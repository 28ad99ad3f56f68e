"""tools/rehearse_vagrant.py's stand-in for vagrant: each call the scenario makes reaches the
right guest, as the right operation, with its standard input. That the scenario passes
against real guests is the rehearsal itself (README, "Failover")."""

import subprocess
import sys

from tests.vm.harness import Completed
from tools import rehearse_vagrant


class FakeGuest:
    def __init__(self) -> None:
        self.runs: list[tuple[list[str], bytes]] = []
        self.powered_off = False

    def run(self, cmd, *, input=None, check=True, timeout=None):
        self.runs.append((cmd, input))
        return Completed(cmd, 7, "out\n", "err\n")

    def power_off(self) -> None:
        self.powered_off = True


def machines():
    return rehearse_vagrant.Machines(pair=None, guests={"node1": FakeGuest(), "node2": FakeGuest()})


def test_ssh_runs_the_command_as_root_in_that_guest_with_its_input():
    lab = machines()
    answer = lab.vagrant(["ssh", "node2", "--no-tty", "-c", "sudo appliancectl pair status", "--", "-q"], b"key")
    ((cmd, stdin),) = lab.guests["node2"].runs
    assert cmd[:2] == ["bash", "-c"] and cmd[2].endswith("sudo appliancectl pair status")
    assert stdin == b"key" and not lab.guests["node1"].runs
    assert answer == (7, "out\n", "err\n")


def test_a_forced_halt_powers_off_the_machine_named_after_the_option():
    lab = machines()
    assert lab.vagrant(["halt", "--force", "node1"], b"")[0] == 0
    assert lab.guests["node1"].powered_off and not lab.guests["node2"].powered_off


def test_a_call_with_no_stand_in_fails_and_says_so():
    rc, _, err = machines().vagrant(["destroy", "node1"], b"")
    assert rc == 2 and "vagrant destroy node1" in err


def test_the_stand_in_forwards_a_call_and_returns_its_output_and_status(tmp_path):
    lab = machines()
    path = str(tmp_path / "vagrant.sock")
    server = rehearse_vagrant.serve(lab, path)
    try:
        done = subprocess.run(
            [sys.executable, rehearse_vagrant.__file__, "forward", path, "ssh", "node1", "--no-tty", "-c", "true"],
            input=b"secret",
            capture_output=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")
    assert lab.guests["node1"].runs[0][1] == b"secret"
