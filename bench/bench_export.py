"""How far an exported personal model is from the gated one: `fedmosaic export` of every client of
finished runs, Self per own task of the gated model (input-dependent β) and of the merged model
(one constant β per module, the gate's mean on the client's own training samples).

    python bench/bench_export.py RUN_DIR [RUN_DIR ...] [--beta-samples 32]

Prints one row per client and task, then per run and over all runs the mean merged − gated
difference with a 95 % t-interval over tasks, the β spread and the largest reload differences.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import typer
from scipy import stats

from client_app.export import ExportError, export_client, open_finished_client
from client_app.resources import get_resources

app = typer.Typer(add_completion=False)


def _interval(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.1f}" if values else "-"
    mean, sem = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return f"{mean:+.1f} ± {half:.1f}"


@app.command()
def main(
    run_dirs: list[Path],
    beta_samples: int = typer.Option(32, help="own training samples per task for the mean β"),
    threads: int = typer.Option(1, help="torch threads"),
) -> None:
    torch.set_num_threads(threads)
    typer.echo("| run | client | model | task | β mean (min-max) | gated | merged | merged − gated |\n"
               "|---|---|---|---|---|---|---|---|")
    every: list[float] = []
    worst = [0.0, 0.0]
    summaries = []
    for run_dir in run_dirs:
        gaps: list[float] = []
        started = time.perf_counter()
        first = open_finished_client(run_dir, "0")
        resources = get_resources(first.config)
        for entry in resources.scenario.clients:
            cid = str(entry.client_id)
            with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
                try:
                    report = export_client(open_finished_client(run_dir, cid), Path(tmp) / "out",
                                           beta_samples=beta_samples, progress=lambda _m: None)
                except ExportError as err:
                    typer.echo(f"| {run_dir.name} | {cid} | {entry.model_id} | - | - | - | - | {err} |")
                    continue
            beta = report["beta"]
            for task, gated in report["self_gated"].items():
                gap = report["self_gap"][task]
                gaps.append(gap)
                typer.echo(f"| {run_dir.name} | {cid} | {entry.model_id} | {task} | {beta['mean']:.2f} "
                           f"({beta['min']:.2f}-{beta['max']:.2f}) | {gated:.1f} | {report['self_merged'][task]:.1f} | {gap:+.1f} |")
            worst[0] = max(worst[0], report["checks"]["checkpoint_max_abs_logit_diff"])
            worst[1] = max(worst[1], report["checks"]["peft_max_abs_logit_diff"])
        every += gaps
        summaries.append(f"{run_dir.name}: merged − gated {_interval(gaps)} points over {len(gaps)} tasks "
                         f"({time.perf_counter() - started:.0f} s)")
    typer.echo("\n" + "\n".join(summaries))
    typer.echo(f"all runs: merged − gated {_interval(every)} points over {len(every)} tasks; largest reload "
               f"logit difference: checkpoint {worst[0]:.1e}, peft adapter {worst[1]:.1e}")


if __name__ == "__main__":
    app()
