"""Run the ``fedmosaic`` command line in its own process group, killed by pid when the test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_fedmosaic(args: list[str], cache: Path, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m fedmosaic_cli.main ARGS`` offline with ``FEDMOSAIC_CACHE=cache``; output merged.
    From another ``cwd`` it runs as the console script does, without the cwd on its own sys.path
    (``-P``): the installed package, not whatever ``cwd`` holds."""
    env = dict(os.environ, FEDMOSAIC_CACHE=str(cache), HF_HUB_OFFLINE="1")
    command = [sys.executable, *([] if cwd == ROOT else ["-P"]), "-m", "fedmosaic_cli.main", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, cwd=cwd)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, output, "")
