"""The host's half of a benchmark that measures inside one guest: boot a QEMU guest with the
VM harness, run the benchmark script again in it (its in-guest half prints its samples as
the last line of JSON), and keep the samples.

The guest imports this checkout (the harness shares the host's root file system), so the
in-guest half measures the code beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.vm.appliance import VENV_BIN
from tests.vm.harness import REPO_ROOT, Guest, check_platform

GUEST_TIMEOUT = 3600


def run(
    name: str,
    logs: Path,
    script: str,
    arguments: Sequence[str],
    prepare: Callable[[Guest], object],
    cpus: int = 1,
    memory: str = "1536M",
) -> Any:
    """Boot the guest ``name`` (its logs in ``logs``), ``prepare`` it, run ``script`` (a
    benchmark's ``__file__``) with ``arguments`` there, and return the JSON it printed last.
    What it printed on stderr (its progress) is echoed."""
    check_platform()
    guest = Guest(name, logs, memory=memory, cpus=cpus)
    guest.start()
    try:
        prepare(guest)
        command = [str(VENV_BIN / "python"), str(Path(script).resolve()), *arguments]
        done = guest.run(command, timeout=GUEST_TIMEOUT, env={"PYTHONPATH": str(REPO_ROOT)})
    finally:
        guest.stop()
    print(done.stderr.strip(), file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def keep(args: argparse.Namespace, samples: Any, logs: Path) -> None:
    """Write the arguments and every sample to ``--output`` (if given); say where the logs are."""
    if args.output:
        args.output.write_text(json.dumps({"arguments": vars(args) | {"output": str(args.output)}, "samples": samples}))
    print(f"guest logs: {logs}")
