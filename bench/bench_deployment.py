"""Deployment under load, and its overhead over simulation, measured in one run.

Builds a tiny DRAKE-mini and an N-client scenario (default 20: the 18 client tasks of DRAKE-mini,
then copies of them under new subset ids, since each task belongs to one client), then runs the
same federation twice through the command line a user runs:

- ``fedmosaic main-job``: Flower's simulation runtime;
- ``fedmosaic local-deployment``: a SuperLink and N SuperNodes, each a separate process with its
  own ``--node-config`` client id and state directory, TLS, SuperNode authentication and process
  isolation (a SuperExec per app); once per ``--workers`` value: 0, every message answered in the
  fresh ClientApp process Flower starts for it (torch, data and model loaded again each time);
  -1, one warm ClientApp worker per SuperNode; K, K workers shared by the SuperNodes.

It checks that no message was lost (every client's reply in every round) and prints, for each:
wall time, the per-round time the ServerApp measured (send to last reply), messages and bytes
per round (train instructions down + replies up), and the peak memory of the whole process tree
(sampled RSS, every 0.5 s, by the command itself: ``timing.json``). The ratio deployment / simulation is of the same rounds, same
machine, same run of this script.

    python bench/bench_deployment.py [--clients 20] [--rounds 3] [--workers 0,-1] [--skip-simulation]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import typer

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def run_cli(args: list[str], cache: Path, log: Path) -> tuple[int, float]:
    """Run ``fedmosaic ARGS``; (exit code, wall seconds)."""
    env = dict(os.environ, FEDMOSAIC_CACHE=str(cache), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    with open(log, "w") as sink:
        code = subprocess.run([sys.executable, "-m", "fedmosaic_cli.main", *args], env=env, cwd=ROOT,
                              stdout=sink, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - started


def round_figures(run_dir: Path, clients: int, rounds: int) -> dict[str, float]:
    """Per-round time, messages and bytes from the run's rounds.jsonl; fails on a lost message."""
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    by_round = {r: [row for row in rows if row["round"] == r] for r in range(1, rounds + 1)}
    lost = {r: clients - len(rs) for r, rs in by_round.items() if len(rs) != clients}
    if lost:
        raise SystemExit(f"messages lost in {run_dir}: replies missing per round {lost}")
    return {
        "round_s": mean(rs[0]["round_time_s"] for rs in by_round.values()),
        "messages_per_round": 2.0 * clients,
        "bytes_down_per_round": mean(sum(row["bytes_down"] for row in rs) for rs in by_round.values()),
        "bytes_up_per_round": mean(sum(row["bytes_up"] for row in rs) for rs in by_round.values()),
    }


@app.command()
def main(
    clients: int = typer.Option(20, help="SuperNodes / simulated clients"),
    rounds: int = typer.Option(3, help="server rounds"),
    local_steps: int = typer.Option(2, help="training steps per round"),
    workers: str = typer.Option("0,-1", help="one deployment per value: warm ClientApp workers (0 none, -1 one "
                                             "per SuperNode, K shared)"),
    skip_simulation: bool = typer.Option(False, help="only the deployment"),
    keep: Path | None = typer.Option(None, help="keep everything in this folder (default: a temporary one)"),
) -> None:
    from drake_data.mini.builder import build_drake_mini, write_scaled_scenario

    work = keep or Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    try:
        data_root = build_drake_mini(work / "mini", seed=0, size="tiny")
        scenario = write_scaled_scenario(data_root, clients)
        common = [f"data-root='{data_root}'", f"scenario='{scenario}'", f"num-server-rounds={rounds}",
                  f"local-steps={local_steps}", "eval-max-samples=2", "eval-others-max-samples=2",
                  "rounds-per-task=1", "pretrained=false", "align-bases=false", "eval-unseen=false",
                  "batch-size=4", "torch-threads=1"]
        results: dict[str, dict[str, float]] = {}
        runs = [(f"deployment-w{k}".replace("w-1", "wnode"), ["local-deployment", "--workers", k])
                for k in (w.strip() for w in workers.split(",")) if k]
        if not skip_simulation:
            runs.insert(0, ("simulation", ["main-job"]))
        for name, command in runs:
            cache = work / f"cache-{name}"
            args = [*command, "--run-config", " ".join([*common, f"run-name='{name}'"])]
            code, wall = run_cli(args, cache, work / f"{name}.log")
            if code != 0:
                raise SystemExit(f"{name} failed (exit {code}); log: {work / f'{name}.log'}")
            timing = json.loads((cache / "runs" / name / "report" / "timing.json").read_text())
            results[name] = {"wall_s": wall, "peak_rss_gib": timing["peak_rss_gib"],
                             **round_figures(cache / "runs" / name, clients, rounds)}
        print(f"{clients} clients x {rounds} rounds, {local_steps} local steps, tiny presets (untrained), "
              f"{os.cpu_count()} CPUs; no message lost")
        print(f"{'':16} {'wall s':>8} {'round s':>8} {'msgs/round':>10} {'MB down/round':>13} "
              f"{'MB up/round':>11} {'peak RSS GiB':>12}")
        for name, r in results.items():
            print(f"{name:16} {r['wall_s']:>8.1f} {r['round_s']:>8.1f} {r['messages_per_round']:>10.0f} "
                  f"{r['bytes_down_per_round'] / 1e6:>13.2f} {r['bytes_up_per_round'] / 1e6:>11.2f} "
                  f"{r['peak_rss_gib']:>12.2f}")
        for name in results:
            if name != "simulation" and "simulation" in results:
                ratio = results[name]["round_s"] / results["simulation"]["round_s"]
                print(f"per-round time, {name} / simulation: {ratio:.2f}")
        if len(results) > 1 and "deployment-w0" in results:
            for name in results:
                if name.startswith("deployment-") and name != "deployment-w0":
                    ratio = results["deployment-w0"]["round_s"] / results[name]["round_s"]
                    print(f"per-round time, deployment-w0 (no worker) / {name}: {ratio:.2f}")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app()
