"""Option-likelihood scoring: one full forward per (prompt, option) row against each prompt once
with its options scored from the repeated cache (what ``option_log_likelihoods`` does).

For every client of a finished run, its final adapter (learned gates included) scores its own
tasks' test questions both ways, in the same process: wall time of each, their ratio, whether
every pick agrees and the largest difference of a log-likelihood.

    python bench/bench_scoring.py RUN_DIR [--questions 96] [--threads 1]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer

from client_app.export import open_finished_client
from client_app.resources import get_resources
from fedmosaic_core.models.scoring import _one_row_per_option, option_log_likelihoods
from fedmosaic_flower.config import parse_run_config

app = typer.Typer(add_completion=False)


def _picks(scores: list[list[float]]) -> list[int]:
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


@app.command()
def main(
    run_dir: Path,
    questions: int = typer.Option(96, help="test questions per task (the first N)"),
    threads: int = typer.Option(1, help="torch threads"),
    batch: int = typer.Option(16, help="questions per batch, both ways"),
) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    config = parse_run_config({k.replace("_", "-"): v for k, v in saved.items()})
    torch.set_num_threads(threads)
    resources = get_resources(config)
    typer.echo("| client | model | task | rows | per-row s | shared-prompt s | speed-up | picks equal | max abs diff |\n"
               "|---|---|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for entry in resources.scenario.clients:
        cid = str(entry.client_id)
        adapted = open_finished_client(run_dir, cid).adapted  # its adapter of the last round it completed
        model, processor = adapted.model.eval(), adapted.loaded.processor
        for ref in entry.datasets:
            samples = [s for s in resources.test_samples(ref, questions) if s.choices]
            choices = [list(s.choices or []) for s in samples]
            with torch.no_grad():
                start = time.perf_counter()
                per_row = [v for i in range(0, len(samples), batch)
                           for v in _one_row_per_option(model, processor, samples[i : i + batch],
                                                        choices[i : i + batch], config.max_length)]
                middle = time.perf_counter()
                shared = option_log_likelihoods(model, processor, samples, choices, config.max_length, batch)
                end = time.perf_counter()
            diff = max(abs(a - b) for x, y in zip(per_row, shared, strict=True) for a, b in zip(x, y, strict=True))
            totals[0] += middle - start
            totals[1] += end - middle
            typer.echo(f"| {cid} | {entry.model_id} | {ref.key} | {sum(map(len, choices))} | {middle - start:.2f} | "
                       f"{end - middle:.2f} | {(middle - start) / (end - middle):.2f} | "
                       f"{_picks(per_row) == _picks(shared)} | {diff:.1e} |")
    typer.echo(f"\nall tasks: per-row {totals[0]:.1f} s, shared-prompt {totals[1]:.1f} s, "
               f"speed-up {totals[0] / totals[1]:.2f}")


if __name__ == "__main__":
    app()
