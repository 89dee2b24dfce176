"""Paired differences between methods of a `fedmosaic compare` run, with 95 % confidence intervals.

Pairs are (seed, client): the same client on the same seed's data under two methods. For each
method against a reference method (default ``fedmosaic``): the mean difference of Self A_last,
Others A_last and Unseen A_last in points, and its 95 % t-interval over the pairs; then Self
A_last per base model.

    python bench/paired_comparison.py <comparison folder with comparison.json> [--reference fedmosaic]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import typer
from scipy import stats

METRICS = ("self_last", "others_last", "unseen_last")


def _clients(run_dir: str, seed: int) -> dict[tuple[int, str], dict]:  # type: ignore[type-arg]
    summary = json.loads((Path(run_dir) / "report" / "summary.json").read_text())
    return {(seed, client): entry for client, entry in summary["clients"].items()}


def _interval(diffs: list[float]) -> str:
    values = np.array([d for d in diffs if math.isfinite(d)])
    if len(values) < 2:
        return "—"
    mean = values.mean()
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"


def main(folder: Path, reference: str = typer.Option("fedmosaic", help="method the others are compared with")) -> None:
    results = json.loads((folder / "comparison.json").read_text())
    per_method = {}
    for method, entry in results.items():
        clients: dict[tuple[int, str], dict] = {}  # type: ignore[type-arg]
        for run_dir in entry["runs"]:
            seed = int(json.loads((Path(run_dir) / "config.json").read_text())["seed"])
            clients.update(_clients(run_dir, seed))
        per_method[method] = clients
    ref = per_method[reference]
    typer.echo(f"Paired difference (method − {reference}), points, mean [95 % CI] over (seed, client) pairs, n = {len(ref)}\n")
    typer.echo("| method | Self A_last | Others A_last | Unseen A_last |\n|---|---|---|---|")
    for method, clients in per_method.items():
        if method == reference:
            continue
        cells = [_interval([float(clients[k][m]) - float(ref[k][m]) for k in ref if k in clients]) for m in METRICS]
        typer.echo(f"| {method} | " + " | ".join(cells) + " |")
    models = sorted({c["model_id"] for c in ref.values()})
    typer.echo("\nSelf A_last by base model, mean % [95 % CI] over (seed, client)\n")
    typer.echo("| method | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    for method, clients in per_method.items():
        cells = []
        for model in models:
            values = np.array([float(c["self_last"]) for c in clients.values() if c["model_id"] == model])
            half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
            cells.append(f"{100 * values.mean():.1f} [{100 * (values.mean() - half):.1f}, {100 * (values.mean() + half):.1f}]")
        typer.echo(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    typer.run(main)
