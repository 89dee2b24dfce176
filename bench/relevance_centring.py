"""Does centring the task vectors make RELA's relevance follow skill better? (issue 11 candidate)

For finished FedMosaic runs, from the server's last checkpoint (the task vectors as the server
holds them, compressed): the relevance ``s_ij`` as the runs compute it, and the same after
centring, that is each vector's columns scaled to norm 1 and the federation mean subtracted
before the column-wise cosine. Per run:

* the AUROC of ``s_ij`` over client pairs, same skill group (DRAKE-mini's ``tasks.json``) against
  the rest;
* the spread (standard deviation) of the off-diagonal ``s_ij``;
* the mean weight ``w_ij = softmax_j(s_ij / τ)`` (the run's τ) that a client puts on its
  same-group peers.

    python bench/relevance_centring.py RUN_DIR [RUN_DIR ...]

Prints one table (mean ± 95 % t-interval over the runs) and the per-run AUROCs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from safetensors.numpy import load_file

from fedmosaic_cli.comparison import client_chance_and_groups, mean_interval, roc_auc
from fedmosaic_core.rela.similarity import relevance_weights, task_similarity

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def centred(vectors: list[np.ndarray]) -> list[np.ndarray]:
    """Columns scaled to norm 1, then the mean over the federation subtracted."""
    unit = []
    for vector in vectors:
        norms = np.linalg.norm(vector, axis=0, keepdims=True)
        unit.append(vector / np.where(norms > 0, norms, 1.0))
    mean = np.mean(unit, axis=0)
    return [u - mean for u in unit]


def pair_auroc(similarity: np.ndarray, same: np.ndarray) -> float:
    """AUROC of ``s_ij`` over pairs i < j, ``same[i, j]`` (same group) positive."""
    upper = np.triu_indices(len(same), k=1)
    return roc_auc(similarity[upper].tolist(), same[upper].tolist())


def measures(similarity: np.ndarray, same: np.ndarray, tau: float) -> dict[str, float]:
    """AUROC (same group vs rest, pairs i < j), off-diagonal spread, weight on same-group peers."""
    off = ~np.eye(len(same), dtype=bool)
    weights = relevance_weights(similarity, tau=tau)
    return {
        "auroc": pair_auroc(similarity, same),
        "spread": float(similarity[off].std()),
        "same_group_weight": float((weights * same * off).sum(axis=1).mean()),
    }


def run_measures(run_dir: Path) -> dict[str, dict[str, float]]:
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    _, _, group_of = client_chance_and_groups(Path(config["data_root"]), Path(config["scenario"]))
    checkpoint = sorted((run_dir / "checkpoints").glob("round-*"))[-1]
    tensors = load_file(str(checkpoint / "state.safetensors"))
    vectors = {k.split("/", 1)[1]: v.astype(np.float64) for k, v in tensors.items() if k.startswith("task-vectors/")}
    clients = sorted((c for c in vectors if c in group_of), key=int)
    if len(clients) < 3:
        raise typer.BadParameter(f"{run_dir}: fewer than 3 clients with task vectors and a skill group")
    same = np.array([[group_of[a] == group_of[b] for b in clients] for a in clients])
    stack = [vectors[c] for c in clients]
    return {
        "as run": measures(task_similarity(stack), same, float(config["tau"])),
        "centred": measures(task_similarity(centred(stack)), same, float(config["tau"])),
    }


@app.command()
def main(run_dirs: list[Path]) -> None:
    results = {run: run_measures(run) for run in run_dirs}
    typer.echo(f"{len(run_dirs)} runs. Mean ± 95 % over runs.\n")
    typer.echo("| task vectors | relevance AUROC (skill groups) | spread of s_ij | weight on same-group peers |")
    typer.echo("|---|---:|---:|---:|")
    for variant in ("as run", "centred"):
        cells = []
        for key in ("auroc", "spread", "same_group_weight"):
            m = mean_interval([r[variant][key] for r in results.values()])
            cells.append(f"{m['mean']:.3f} ± {m['ci95']:.3f}")
        typer.echo(f"| {variant} | " + " | ".join(cells) + " |")
    paired = mean_interval([r["centred"]["auroc"] - r["as run"]["auroc"] for r in results.values()])
    typer.echo(f"\nAUROC centred − as run, paired: {paired['mean']:+.3f} ± {paired['ci95']:.3f}")
    for run, r in results.items():
        typer.echo(f"{run.name}: AUROC {r['as run']['auroc']:.3f} → {r['centred']['auroc']:.3f}")


if __name__ == "__main__":
    app()
