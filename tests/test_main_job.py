"""The README's main job, end to end through Flower: `fedmosaic main-job` (prepare DRAKE-mini and
the tiny models from scratch, start a simulation SuperLink, `flwr run`, check the run's status),
in a reduced but real setting (fewer rounds and steps than the default)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, FEDMOSAIC_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "fedmosaic_core.cli", "main-job",
        "-c", "num-server-rounds=2", "-c", "local-steps=4", "-c", "eval-max-samples=4",
        "-c", "rounds-per-task=1",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        output, _ = process.communicate(timeout=1500)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-4000:]
    assert "| **mean** |" in output, output[-4000:]
    run_dir = tmp_path / "cache" / "runs" / "two-families-fedmosaic-seed0"
    for name in ("summary.json", "table.md", "scores.png", "relevance.png"):
        assert (run_dir / "report" / name).is_file(), name
    assert (run_dir / "rounds.jsonl").read_text().count("\n") == 2 * 6
    # the aligned A/B of the first-time preparation were used
    assert list((tmp_path / "cache" / "bases").rglob("*.safetensors"))
