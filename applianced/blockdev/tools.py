"""Running the storage tools (mdadm, nbd-client, qemu-nbd) for what has no kernel interface
that would be simpler to use: their output, or a KernelError with what they printed."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from applianced.errors import KernelError


def run(argv: Sequence[str], timeout: float = 60) -> str:
    """Run a tool without a terminal; its standard output."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise KernelError(f"{' '.join(argv[:3])}: {(done.stderr or done.stdout).strip()}")
    return done.stdout
