"""The ``applianced`` daemon: asyncio main loop, D-Bus name, signals, systemd protocols.

Start-up order matters: the kernel is reconciled and every object exported before the bus
name is taken and READY=1 is sent, so that a client never sees a half-built tree.
SIGTERM stops the daemon without touching LIO: initiators stay logged in while it is down.
SIGHUP re-reads the state file. SIGUSR1 writes the Python stack of every thread to standard
error (the journal under systemd): what a daemon that stopped answering waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import signal
from collections.abc import Callable, Iterable
from pathlib import Path

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus

from applianced import __version__, network, systemd
from applianced.bus.objects import ObjectTree
from applianced.constants import BUS_NAME, DEFAULT_STATE_DIR, STATE_FILE_NAME
from applianced.engine import Appliance, Kernel
from applianced.errors import ApplianceError
from applianced.failover.service import Failover
from applianced.iscsi import firewall, presence
from applianced.iscsi.kernel.lio import LioKernel
from applianced.peer.service import Peer
from applianced.replication.bridge import DataPath
from applianced.replication.service import Replication
from applianced.state import StateStore

log = logging.getLogger("applianced")
# Seconds that calls in progress get to finish at SIGTERM: well inside systemd's
# TimeoutStopSec (30 s), and far longer than any read; a change runs to its end anyway.
CALLS_FINISH_TIMEOUT = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="applianced", description="iSCSI SAN appliance daemon")
    parser.add_argument("--state-dir", type=Path, default=Path(DEFAULT_STATE_DIR), help="where the state file lives")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"applianced {__version__}")
    return parser.parse_args(argv)


def main(
    argv: list[str] | None = None,
    kernel_factory: Callable[[], Kernel] = LioKernel,
    firewall_factory: Callable[[], firewall.Firewall] = firewall.NftFirewall,
    resolver: Callable[[str], Iterable[str]] = firewall.resolve_name,
    data_path_factory: Callable[[Path], DataPath] = DataPath,
) -> int:
    # First: it works while the event loop or every thread is blocked, as long as the
    # process lives.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = parse_args(argv)
    systemd.setup_logging("applianced", getattr(logging, args.log_level))
    store = StateStore(args.state_dir, STATE_FILE_NAME)
    engine = Appliance(kernel_factory(), store, network.local_addresses, firewall_factory(), resolver)
    peer = Peer(args.state_dir, network.local_addresses)
    replication = Replication(args.state_dir, engine, peer, data_path_factory(args.state_dir))
    engine.replication = replication
    failover = Failover(args.state_dir, engine, peer, replication)
    try:
        asyncio.run(serve(engine, peer, replication, failover))
    except ApplianceError as exc:
        log.error("applianced cannot start: %s", exc)
        return 1
    return 0


async def serve(engine: Appliance, peer: Peer, replication: Replication, failover: Failover) -> None:
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    try:
        await failover.start_up()
        ObjectTree(bus, engine, peer, replication, failover)
        changes = await engine.start(replication.start)
        log.info("kernel reconciled at start-up with %d change(s)", changes)
        await asyncio.to_thread(engine.seen.load)
        # The link needs the node id, which the state file holds.
        await peer.start(engine.config.node_id)
        reply = await bus.request_name(BUS_NAME)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise RuntimeError(f"{BUS_NAME} is owned by another process; is applianced running already?")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(engine)))
        watchdog = asyncio.ensure_future(_watchdog())
        sampler = asyncio.ensure_future(engine.seen.run())
        monitor = asyncio.ensure_future(replication.run())
        cluster = asyncio.ensure_future(failover.run())
        systemd.notify(f"READY=1\nSTATUS=serving {len(engine.config.targets)} target(s)")
        log.info("applianced %s ready on %s", __version__, BUS_NAME)
        # Watching devices starts after READY: its imports would only delay the start.
        events = presence.BackingEvents()
        await events.start()
        watcher = asyncio.ensure_future(engine.watch_disks(events))
        # Without the bus the daemon goes on (heartbeats, mirrors), out of the
        # administrator's reach until it is restarted.
        bus_lost = asyncio.ensure_future(bus.wait_for_disconnect())
        bus_lost.add_done_callback(_log_bus_lost)
        await stop.wait()
        systemd.notify("STOPPING=1")
        for task in (watchdog, sampler, monitor, cluster, watcher, bus_lost):
            task.cancel()
        events.close()
        await peer.close()
        log.info("stopping; LIO configuration and sessions are left as they are")
        if bus.connected:
            # The bus may go in the meantime (a shutdown stops dbus-daemon too); the name
            # goes with the connection then.
            with contextlib.suppress(OSError, EOFError):
                await bus.release_name(BUS_NAME)
        await _finish_calls_in_progress()
    finally:
        bus.disconnect()


def _log_bus_lost(lost: asyncio.Future[None]) -> None:
    if lost.cancelled():
        return
    why = lost.exception()
    log.error(
        "the system bus went away%s: appliancectl cannot reach this daemon until it is restarted",
        f" ({why!r})" if why else "",
    )


async def _finish_calls_in_progress() -> None:
    """Let the method calls and property reads already running finish and reply.

    Cancelled instead, their tasks would leave callers without an answer, and dbus-fast
    would log each one as an error (it does not expect CancelledError). New calls no longer
    arrive: the bus name is released first.
    """
    running = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    if running:
        await asyncio.wait(running, timeout=CALLS_FINISH_TIMEOUT)


async def _reload(engine: Appliance) -> None:
    systemd.notify("RELOADING=1")
    try:
        changes = await engine.reload()
        log.info("state file reloaded with %d kernel change(s)", changes)
    except ApplianceError as exc:
        log.error("reload failed, running configuration kept: %s", exc)
    finally:
        systemd.notify("READY=1")


async def _watchdog() -> None:
    interval = systemd.watchdog_interval()
    if interval is None:
        return
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
