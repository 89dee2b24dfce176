"""Does a P/Q trained in one architecture help another? PQ-LoRA's premise, measured directly.

For each task (the first task of every client of the scenario) and each base model X of the
federation: train only the shared part (P and Q of the local branch; plain LoRA and gates untouched,
β fixed at 0 so the local branch alone adds to the output) for ``--steps`` AdamW steps at the run's
``lr-pq`` on the task's train split. Then load each trained P/Q into every model Y, with Y's own
A/B as the run uses them (aligned to the anchor), and score the task's test split (option
likelihood, as the runs score). Reported per (source X, target Y): the mean over tasks of the
accuracy gain over Y's untrained base, and of that gain over the gain of Y's own trained P/Q
("transfer"; 1: as good as training in Y itself, 0: no help).

    python bench/bench_pq_transfer.py --cache DIR --seed 5 [--bases aligned|seeded] [--steps 64] [--out cells.json]
    python bench/bench_pq_transfer.py --cache DIR --scenario real-two-families -c "data-root='DRAKE_TEXT' batch-size=4"
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import tomllib
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    cache: Path = typer.Option(None, help="FEDMOSAIC_CACHE (prepared if missing)"),
    seed: int = typer.Option(0, help="DRAKE-mini and preset seed"),
    scenario: str = typer.Option("two-families"),
    steps: int = typer.Option(64, help="AdamW steps of batch `batch-size` per source model and task"),
    threads: int = typer.Option(1),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="run-config overrides, Flower's syntax"),
    bases: str = typer.Option("aligned", help="A/B of the PQ layers: 'aligned' (the run's) or 'seeded' (no "
                                              "alignment: a control)"),
    out: Path = typer.Option(None, help="write every (task, source, target) cell as JSON (for pq_transfer_summary.py)"),
) -> None:
    if cache is not None:
        os.environ["FEDMOSAIC_CACHE"] = str(cache)
    torch.set_num_threads(threads)

    from client_app.resources import get_resources
    from fedmosaic_cli.main import parse_overrides
    from fedmosaic_flower.config import parse_run_config
    from fedmosaic_flower.prepare import prepare_federation

    raw = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    if bases not in ("aligned", "seeded"):
        raise typer.BadParameter(f"--bases must be aligned or seeded, got {bases!r}")
    config = parse_run_config({**raw, **parse_overrides(run_config), "seed": seed, "scenario": scenario,
                               "torch-threads": threads, "align-bases": bases != "seeded"})
    data_root = prepare_federation(config)
    resources = get_resources(config, str(data_root))
    clients = resources.scenario.clients
    models = sorted({c.model_id for c in clients})
    tasks = [c.datasets[0] for c in clients]

    def fresh(model_id: str):  # noqa: ANN202 - the run's adapted model with zero adapters
        return resources.build_adapted(config, model_id)

    typer.echo(f"seed {seed}, scenario {scenario}, {steps} steps, lr-pq {config.lr_pq}, r {config.r}, A/B {bases}")
    cells = measure_transfer(fresh, models, tasks, resources, config, steps, seed)
    print_table(cells)
    if out is not None:
        from fedmosaic_core.storage import atomic_write_json

        atomic_write_json(out, {"seed": seed, "scenario": scenario, "bases": bases, "steps": steps, "cells": cells})


def measure_transfer(fresh, models: list[str], tasks: list, resources, config, steps: int,  # noqa: ANN001
                     seed: int) -> list[dict]:
    """Train P/Q alone in every model X on every task, score each in every model Y. ``fresh(X)``
    builds X's adapted model with zero adapters and its A/B as they are to be compared. One cell
    per (task, source, target): the accuracy of Y's untrained base, of Y with its own trained P/Q
    and of Y with X's."""
    from client_app.evaluation import score_samples
    from fedmosaic_core.models.collate import collate

    def fresh_local_only(model_id: str):  # noqa: ANN202 - β fixed at 0: the local branch alone adds
        adapted = fresh(model_id)
        adapted.model.set_fixed_beta(0.0)
        return adapted

    def accuracy(adapted, ref) -> float:  # noqa: ANN001
        adapted.model.eval()
        with torch.no_grad():
            return score_samples(adapted.model, adapted.loaded.processor, resources.test_samples(ref, config.eval_max_samples),
                                 scoring="likelihood", max_length=config.max_length,
                                 max_new_tokens=config.max_new_tokens).score

    def train_pq(model_id: str, ref) -> dict[str, torch.Tensor]:  # noqa: ANN001
        torch.manual_seed(seed)
        rng = random.Random(seed)
        adapted = fresh_local_only(model_id)
        model = adapted.model
        pq = [p for key, p in model.branch_parameters("local").items() if key.startswith("pq.")]
        optimizer = torch.optim.AdamW(pq, lr=config.lr_pq, weight_decay=config.weight_decay)
        ids = resources.train_ids(ref)
        model.train()
        for _ in range(steps):
            batch = [resources.samples[i] for i in rng.sample(ids, min(config.batch_size, len(ids)))]
            loss = model(**collate(adapted.loaded.processor, batch, config.max_length)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(pq, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model.shared_state("local")

    cells: list[dict] = []
    for ref in tasks:
        trained = {x: train_pq(x, ref) for x in models}
        for y in models:
            target = fresh_local_only(y)
            base = accuracy(target, ref)
            scores = {}
            for x in models:
                target.model.load_local_state(shared=trained[x])
                scores[x] = accuracy(target, ref)
            for x in models:
                cells.append({"task": ref.key, "source": x, "target": y, "base": base, "own": scores[y],
                              "score": scores[x]})
            line = " | ".join(f"{x} {100 * scores[x]:.1f}" for x in models)
            typer.echo(f"{ref.key:16s} target {y:13s} base {100 * base:.1f} | {line}", err=True)
    return cells


def print_table(cells: list[dict]) -> None:
    """Per (source, target): mean gain over the target's base (points) and mean transfer ratio
    (gain / the target's own gain, over the tasks where its own P/Q gained more than 2 points)."""
    gain: dict[tuple[str, str], list[float]] = {}
    transfer: dict[tuple[str, str], list[float]] = {}
    for cell in cells:
        key = (cell["source"], cell["target"])
        gain.setdefault(key, []).append(cell["score"] - cell["base"])
        own = cell["own"] - cell["base"]
        if own > 0.02:  # a ratio only where Y's own training helped
            transfer.setdefault(key, []).append((cell["score"] - cell["base"]) / own)
    typer.echo("\n| source → target | accuracy gain over the base (points) | transfer (gain / own gain) | tasks |")
    typer.echo("|---|---:|---:|---:|")
    for (x, y), values in sorted(gain.items(), key=lambda kv: (kv[0][1], kv[0][0] != kv[0][1], kv[0][0])):
        ratio = transfer.get((x, y), [])
        typer.echo(f"| {x} → {y} | {100 * np.mean(values):+.1f} | {np.mean(ratio) if ratio else float('nan'):.2f} | {len(values)} |")


if __name__ == "__main__":
    app()
