"""Seeds of ``bench_pq_transfer.py`` / ``bench_pq_lineage.py`` (their ``--out`` files) in one table.

Per (source → target): the accuracy gain of the source's P/Q over the target's untrained base,
averaged over the tasks of a seed, then mean ± 95 % t-interval over the seeds; and the target's
own gain the same way, and their ratio (the transfer: 1 as good as training in the target,
0 no help), per seed, then averaged.

    python bench/pq_transfer_summary.py /tmp/lin/cells-*-seeded.json [--symmetric]

``--symmetric``: one row per pair of models, the cells of both directions pooled per seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from fedmosaic_cli.comparison import mean_interval

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    files: list[Path] = typer.Argument(..., help="--out files of the transfer benches, one per seed"),
    symmetric: bool = typer.Option(False, help="one row per pair of models: both directions averaged per seed"),
) -> None:
    runs = [json.loads(f.read_text()) for f in files]
    labels = {(r.get("bases"), r.get("steps")) for r in runs}
    if len(labels) > 1:
        raise typer.BadParameter(f"the files mix settings (A/B, steps): {sorted(labels, key=str)}")
    gains: dict[tuple[str, str], list[float]] = {}
    owns: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        per_pair: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for cell in run["cells"]:
            per_pair.setdefault((cell["source"], cell["target"]), []).append(
                (cell["score"] - cell["base"], cell["own"] - cell["base"]))
        if symmetric:
            merged: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for (x, y), values in per_pair.items():
                merged.setdefault((min(x, y), max(x, y)), []).extend(values)
            per_pair = merged
        for pair, values in per_pair.items():
            gains.setdefault(pair, []).append(100 * float(np.mean([g for g, _ in values])))
            owns.setdefault(pair, []).append(100 * float(np.mean([o for _, o in values])))
    typer.echo(f"{len(runs)} seed(s): {sorted(r['seed'] for r in runs)}; A/B {runs[0].get('bases')}")
    arrow = "↔" if symmetric else "→"
    typer.echo(f"\n| source {arrow} target | gain (points) | target's own gain | transfer | seeds |")
    typer.echo("|---|---:|---:|---:|---:|")
    for (x, y) in sorted(gains, key=lambda p: (p[1], p[0] != p[1], p[0])):
        gain, own = mean_interval(gains[(x, y)]), mean_interval(owns[(x, y)])
        ratio = mean_interval([g / o for g, o in zip(gains[(x, y)], owns[(x, y)], strict=True) if o > 2.0])
        typer.echo(f"| {x} {arrow} {y} | {gain['mean']:+.1f} ± {gain['ci95']:.1f} | {own['mean']:+.1f} ± "
                   f"{own['ci95']:.1f} | {ratio['mean']:.2f} ± {ratio['ci95']:.2f} | {len(gains[(x, y)])} |")


if __name__ == "__main__":
    app()
