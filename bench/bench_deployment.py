"""Deployment under load, and its overhead over simulation, measured in one run.

Builds a tiny DRAKE-mini and an N-client scenario (default 20: the 18 client tasks of DRAKE-mini,
then copies of them under new subset ids, since each task belongs to one client), then runs the
same federation twice through the command line a user runs:

- ``fedmosaic main-job``: Flower's simulation runtime;
- ``fedmosaic local-deployment``: a SuperLink and N SuperNodes, each a separate process with its
  own ``--node-config`` client id and state directory, TLS, SuperNode authentication and process
  isolation (a SuperExec per app).

It checks that no message was lost (every client's reply in every round) and prints, for each:
wall time, the per-round time the ServerApp measured (send to last reply), messages and bytes
per round (train instructions down + replies up), and the peak memory of the whole process tree
(sampled RSS, every 0.5 s). The ratio deployment / simulation is of the same rounds, same
machine, same run of this script.

    python bench/bench_deployment.py [--clients 20] [--rounds 3] [--skip-simulation]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import mean

import typer

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def write_load_scenario(data_root: Path, clients: int) -> str:
    """``scenario-load.json`` with ``clients`` clients of one task each, models as in
    two-families; beyond its 18 tasks, copies of them under new subset ids. Returns its name."""
    base = json.loads((data_root / "scenario-two-families.json").read_text())
    refs = [ref for entry in base for ref in entry["datasets"]]
    models = [entry["model_id"] for entry in base]
    entries = []
    for c in range(clients):
        ref = dict(refs[c % len(refs)])
        if c >= len(refs):
            copy = 100 + c
            for split in ("train", "test"):
                folder = data_root / ref["dataset"] / split
                shutil.copy(folder / f"dataset-{ref['subset_id']}.json", folder / f"dataset-{copy}.json")
            ref["subset_id"] = copy
        entries.append({"client_id": c, "model_id": models[c % len(models)], "datasets": [ref]})
    (data_root / "scenario-load.json").write_text(json.dumps(entries, indent=1))
    return "load"


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_cli(args: list[str], cache: Path, log: Path) -> tuple[int, float, int]:
    """Run ``fedmosaic ARGS``; (exit code, wall seconds, peak RSS of its process tree in bytes)."""
    env = dict(os.environ, FEDMOSAIC_CACHE=str(cache), HF_HUB_OFFLINE="1")
    peak = 0
    started = time.monotonic()
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "fedmosaic_cli.main", *args], env=env, cwd=ROOT,
                                   stdout=sink, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.5):
                peak = max(peak, _tree_rss_bytes(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stop.set()
        sampler.join()
    return code, time.monotonic() - started, peak


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
    skip_simulation: bool = typer.Option(False, help="only the deployment"),
    keep: Path | None = typer.Option(None, help="keep everything in this folder (default: a temporary one)"),
) -> None:
    from drake_data.mini.builder import build_drake_mini

    work = keep or Path(tempfile.mkdtemp(prefix="bench-deployment-"))
    try:
        data_root = build_drake_mini(work / "mini", seed=0, size="tiny")
        scenario = write_load_scenario(data_root, clients)
        common = [f"data-root='{data_root}'", f"scenario='{scenario}'", f"num-server-rounds={rounds}",
                  f"local-steps={local_steps}", "eval-max-samples=2", "eval-others-max-samples=2",
                  "rounds-per-task=1", "pretrained=false", "align-bases=false", "eval-unseen=false",
                  "batch-size=4", "torch-threads=1"]
        results: dict[str, dict[str, float]] = {}
        runs = [("deployment", ["local-deployment"])]
        if not skip_simulation:
            runs.insert(0, ("simulation", ["main-job"]))
        for name, command in runs:
            cache = work / f"cache-{name}"
            args = [*command, "--run-config", " ".join([*common, f"run-name='{name}'"])]
            code, wall, peak = run_cli(args, cache, work / f"{name}.log")
            if code != 0:
                raise SystemExit(f"{name} failed (exit {code}); log: {work / f'{name}.log'}")
            results[name] = {"wall_s": wall, "peak_rss_gib": peak / 2**30,
                             **round_figures(cache / "runs" / name, clients, rounds)}
        print(f"{clients} clients x {rounds} rounds, {local_steps} local steps, tiny presets (untrained), "
              f"{os.cpu_count()} CPUs; no message lost")
        print(f"{'':12} {'wall s':>8} {'round s':>8} {'msgs/round':>10} {'MB down/round':>13} "
              f"{'MB up/round':>11} {'peak RSS GiB':>12}")
        for name, r in results.items():
            print(f"{name:12} {r['wall_s']:>8.1f} {r['round_s']:>8.1f} {r['messages_per_round']:>10.0f} "
                  f"{r['bytes_down_per_round'] / 1e6:>13.2f} {r['bytes_up_per_round'] / 1e6:>11.2f} "
                  f"{r['peak_rss_gib']:>12.2f}")
        if "simulation" in results:
            ratio = results["deployment"]["round_s"] / results["simulation"]["round_s"]
            print(f"per-round time, deployment / simulation: {ratio:.2f}")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app()
