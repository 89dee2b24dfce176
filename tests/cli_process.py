"""Run the ``fedmosaic`` command line in its own process group, killed by pid when the test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fedmosaic(args: list[str], cache: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m fedmosaic_cli.main ARGS`` offline with ``FEDMOSAIC_CACHE=cache``; output merged."""
    env = dict(os.environ, FEDMOSAIC_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "fedmosaic_cli.main", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, cwd=ROOT)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, output, "")
