"""The mirrors' throttle between namespaces: the traffic to a copy's export is held to its
rate, other traffic is not, and clearing the throttles leaves the interface as it was."""

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.netns import Namespace, link

pytestmark = pytest.mark.netns

SOURCE, TARGET = "10.235.0.1", "10.235.0.2"
EXPORT, OTHER = 10809, 10900
KBIT = 8000  # 1 MB/s

APPLY = textwrap.dedent(
    """
    import json, sys
    from applianced.replication import throttle
    throttle.apply([throttle.Limit(*limit) for limit in json.loads(sys.argv[1])])
    """
)
SINK = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(listener):
        while True:
            connection, _ = listener.accept()
            while connection.recv(1 << 20):
                pass
    for port in map(int, sys.argv[2:]):
        listener = socket.create_server((sys.argv[1], port))
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    """
)
SEND = textwrap.dedent(
    """
    import socket, sys, time
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    chunk, sent, start = b"x" * 65536, 0, time.monotonic()
    while time.monotonic() - start < 3:
        sock.sendall(chunk)
        sent += len(chunk)
    print(sent / (time.monotonic() - start))
    """
)


@pytest.fixture
def nodes():
    source, target = Namespace("thr-s"), Namespace("thr-t")
    try:
        link(source, [f"{SOURCE}/24"], target, [f"{TARGET}/24"], names=("thr-s", "thr-t"))
        sink = subprocess.Popen(
            [*target.exec_prefix, sys.executable, "-c", SINK, TARGET, str(EXPORT), str(OTHER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout.readline().strip() == "ready"
        yield source
        sink.kill()
    finally:
        source.delete()
        target.delete()


def rate(source: Namespace, port: int) -> float:
    done = source.run(sys.executable, "-c", SEND, TARGET, str(port))
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def throttle(source: Namespace, limits) -> None:
    done = subprocess.run([*source.exec_prefix, sys.executable, "-c", APPLY, json.dumps(limits)], capture_output=True)
    assert done.returncode == 0, done.stderr


def test_the_export_traffic_is_held_to_its_rate_and_nothing_else(nodes):
    throttle(nodes, [[TARGET, EXPORT, KBIT]])
    limited, free = rate(nodes, EXPORT), rate(nodes, OTHER)
    print(f"throttled {limited / 1e6:.2f} MB/s, other traffic {free / 1e6:.1f} MB/s")
    assert 0.6e6 < limited < 1.6e6, "about 1 MB/s (8000 Kbit/s)"
    assert free > 10 * limited
    throttle(nodes, [[TARGET, EXPORT, 0]])
    assert "noqueue" in nodes.run("tc", "qdisc", "show", "dev", "thr-s").stdout
    assert rate(nodes, EXPORT) > 10 * limited


def test_a_root_qdisc_of_the_administrator_is_left_alone(nodes):
    assert (
        nodes.run(
            "tc",
            "qdisc",
            "add",
            "dev",
            "thr-s",
            "root",
            "handle",
            "1:",
            "tbf",
            "rate",
            "100mbit",
            "burst",
            "32kbit",
            "latency",
            "50ms",
        ).returncode
        == 0
    )
    throttle(nodes, [[TARGET, EXPORT, KBIT]])
    assert "tbf" in nodes.run("tc", "qdisc", "show", "dev", "thr-s").stdout
