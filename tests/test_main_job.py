"""The README's main job, end to end through Flower: `fedmosaic main-job` (build DRAKE-mini and align
A/B from scratch, start a simulation SuperLink, `flwr run`, check the run's status), in a reduced
but real setting: fewer rounds and steps, and untrained presets, since pretraining them takes about
five minutes of the suite's fifteen (pretraining itself, also in parallel workers, is tested in
test_models.py; its full run is measured in BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_process import run_fedmosaic


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path: Path) -> None:
    """Run from a folder whose packages have the app's names and fail on import (another checkout,
    say): the run must use the app that `flwr run` installed, in the ServerApp and the ClientApps."""
    elsewhere = tmp_path / "elsewhere"
    for package in ("client_app", "server_app", "fedmosaic_core", "fedmosaic_flower", "drake_data"):
        (elsewhere / package).mkdir(parents=True)
        (elsewhere / package / "__init__.py").write_text(f"raise ImportError('{package} imported from the cwd')\n")
    result = run_fedmosaic(
        ["main-job", "-c", "num-server-rounds=2", "-c", "local-steps=4", "-c", "eval-max-samples=4",
         "-c", "rounds-per-task=1", "-c", "pretrained=false", "-c", "eval-others-max-samples=4"],
        tmp_path / "cache", timeout=1500, cwd=elsewhere,
    )
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert "| **mean** |" in output, output[-4000:]
    run_dir = tmp_path / "cache" / "runs" / "two-families-fedmosaic-seed0"
    for name in ("summary.json", "table.md", "scores.png", "relevance.png"):
        assert (run_dir / "report" / name).is_file(), name
    assert (run_dir / "rounds.jsonl").read_text().count("\n") == 2 * 9
    outcomes = [json.loads(line) for line in (run_dir / "outcomes.jsonl").read_text().splitlines()]
    assert [(o["round"], len(o["selected"]), len(o["replied"])) for o in outcomes] == [(1, 9, 9), (2, 9, 9)]
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert set(summary["last_selected_round"].values()) == {2} and summary["left_out"] == {}
    # the aligned A/B of the first-time preparation were used
    assert list((tmp_path / "cache" / "bases").rglob("*.safetensors"))
    # the simulation ran under a FLWR_HOME of its own run folder
    homes = list((tmp_path / "cache" / "flwr-home").glob("two-families-fedmosaic-seed0-*"))
    assert len(homes) == 1 and (homes[0] / "superlink.log").is_file(), homes
