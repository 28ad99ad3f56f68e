"""Daemon life cycle: restart without touching the kernel, restore after a reboot, reload."""

import json
import signal
import stat
import subprocess
import time

from applianced.bus.paths import target_path
from applianced.constants import BUS_NAME
from tests.conftest import POLICY
from tests.support.daemon import INITIATOR, Daemon
from tests.support.fake_kernel import SLOW_SESSIONS_ENV
from tests.support.private_bus import PrivateBus


def read_session_count(bus) -> subprocess.Popen[str]:
    """One Get of t1's SessionCount, running in the background."""
    read = [
        "dbus-send", f"--bus={bus.address}", "--print-reply", f"--dest={BUS_NAME}", target_path("t1"),
        "org.freedesktop.DBus.Properties.Get", f"string:{BUS_NAME}.Target", "string:SessionCount",
    ]  # fmt: skip
    return subprocess.Popen(read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_stops_cleanly_and_leaves_the_kernel_alone(daemon):
    daemon.configure_first_slice()
    kernel = daemon.kernel_file.read_bytes()
    assert daemon.stop(signal.SIGTERM) == 0
    assert daemon.kernel_file.read_bytes() == kernel
    assert "the system bus went away" not in daemon.log_text()


def test_sigterm_lets_a_read_in_progress_answer(bus, tmp_path):
    daemon = Daemon(bus.address, tmp_path, extra_env={SLOW_SESSIONS_ENV: "2"})
    daemon.start()
    daemon.configure_first_slice()
    # One property read, which now takes 2 s in the kernel; SIGTERM comes in the middle.
    reader = read_session_count(bus)
    time.sleep(1)
    assert daemon.stop(signal.SIGTERM) == 0
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert "uint32 0" in out
    assert "Traceback" not in daemon.log_text()


def test_sigusr1_writes_every_threads_stack_and_the_daemon_goes_on(bus, tmp_path):
    daemon = Daemon(bus.address, tmp_path, extra_env={SLOW_SESSIONS_ENV: "3"})
    daemon.start()
    try:
        daemon.configure_first_slice()
        # A read that blocks a worker thread in the kernel for 3 s: the dump shows where.
        reader = read_session_count(bus)
        time.sleep(1)
        daemon.signal(signal.SIGUSR1)
        out, err = reader.communicate(timeout=30)
        assert reader.returncode == 0 and "uint32 0" in out, err
        dump = daemon.log_text()
        assert dump.count("(most recent call first)") >= 2, dump  # the loop's thread and the worker
        assert "in sessions" in dump and "in run_forever" in dump, dump
        assert daemon.cli("target", "list").returncode == 0
    finally:
        assert daemon.stop(signal.SIGTERM) == 0


def test_sigterm_after_the_bus_went_away_stops_cleanly(tmp_path):
    # A shutdown stops dbus-daemon too, often before applianced.
    bus = PrivateBus(POLICY)
    bus.start()
    daemon = Daemon(bus.address, tmp_path)
    try:
        daemon.start()
        daemon.configure_first_slice()
        kernel = daemon.kernel_file.read_bytes()
        bus.stop()
        time.sleep(0.5)
        assert daemon.stop(signal.SIGTERM) == 0
        log = daemon.log_text()
        assert "the system bus went away" in log and "Traceback" not in log
        assert daemon.kernel_file.read_bytes() == kernel
    finally:
        if daemon.process:
            daemon.process.kill()
        bus.stop()


def test_restart_over_an_intact_kernel_makes_no_change(daemon):
    daemon.configure_first_slice()
    daemon.stop()
    changes = len(daemon.kernel_log)
    daemon.start()
    assert len(daemon.kernel_log) == changes
    assert "reconciled at start-up with 0 change(s)" in daemon.log_text()
    assert [t["name"] for t in daemon.cli("--json", "target", "list").json()] == ["t1"]


def test_start_after_reboot_restores_everything(daemon):
    daemon.configure_first_slice()
    daemon.stop()
    kernel = json.loads(daemon.kernel_file.read_text())
    daemon.kernel_file.unlink()  # what a reboot does to LIO
    daemon.start()
    assert json.loads(daemon.kernel_file.read_text()) == kernel
    assert daemon.cli("--json", "lun", "list").json() == [{"target": "t1", "lun": 0, "disk": "d1", "read_only": False}]


def test_state_file_is_private_and_versioned(daemon):
    daemon.configure_first_slice()
    path = daemon.state_dir / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert [t["name"] for t in data["targets"]] == ["t1"]


def test_sighup_reloads_an_edited_state_file(daemon):
    daemon.configure_first_slice()
    path = daemon.state_dir / "state.json"
    data = json.loads(path.read_text())
    data["targets"][0]["acls"] = []
    path.write_text(json.dumps(data))
    daemon.signal(signal.SIGHUP)
    _wait_for(lambda: daemon.cli("--json", "acl", "list").json() == [])
    assert INITIATOR not in daemon.kernel_file.read_text()


def test_sighup_with_a_broken_file_keeps_the_running_configuration(daemon):
    daemon.configure_first_slice()
    kernel = daemon.kernel_file.read_bytes()
    (daemon.state_dir / "state.json").write_text("{ not json")
    daemon.signal(signal.SIGHUP)
    _wait_for(lambda: "reload failed" in daemon.log_text())
    assert daemon.kernel_file.read_bytes() == kernel
    assert daemon.cli("--json", "acl", "list").json() == [{"target": "t1", "initiator": INITIATOR, "auth": "inherited"}]


def test_second_daemon_on_the_same_bus_refuses_to_start(daemon, bus, tmp_path):
    second = Daemon(bus.address, tmp_path / "second")
    (tmp_path / "second").mkdir()
    try:
        second.start(timeout=10)
    except RuntimeError as exc:
        assert f"{BUS_NAME} is owned by another process" in str(exc)
    else:
        second.stop()
        raise AssertionError("a second daemon took over the bus name")


def _wait_for(condition, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
