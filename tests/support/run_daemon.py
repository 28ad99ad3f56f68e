"""Runs the real applianced daemon with the in-memory kernel, for the D-Bus tier.

Usage: python -m tests.support.run_daemon KERNEL_FILE [applianced arguments...]
The kernel file stands for LIO across daemon restarts; deleting it is a "reboot".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from applianced.daemon import main
from tests.support.fake_kernel import FAIL_ENV, FakeKernel

if __name__ == "__main__":
    kernel_file = Path(sys.argv[1])
    raise SystemExit(main(sys.argv[2:], lambda: FakeKernel(kernel_file, os.environ.get(FAIL_ENV))))
