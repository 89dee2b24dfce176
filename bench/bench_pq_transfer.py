"""Does a P/Q trained in one architecture help another? PQ-LoRA's premise, measured directly.

For each task (the first task of every client of the scenario) and each base model X of the
federation: train only the shared part (P and Q of the local branch; plain LoRA and gates untouched,
β fixed at 0 so the local branch alone adds to the output) for ``--steps`` AdamW steps at the run's
``lr-pq`` on the task's train split. Then load each trained P/Q into every model Y, with Y's own
A/B as the run uses them (aligned to the anchor), and score the task's test split (option
likelihood, as the runs score). Reported per (source X, target Y): the mean over tasks of the
accuracy gain over Y's untrained base, and of that gain over the gain of Y's own trained P/Q
("transfer"; 1: as good as training in Y itself, 0: no help).

    python bench/bench_pq_transfer.py --cache DIR --seed 5 [--bases aligned|seeded] [--steps 64]
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
) -> None:
    if cache is not None:
        os.environ["FEDMOSAIC_CACHE"] = str(cache)
    torch.set_num_threads(threads)

    from client_app.evaluation import score_samples
    from client_app.resources import get_resources
    from fedmosaic_cli.main import parse_overrides
    from fedmosaic_core.models.collate import collate
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
        adapted = resources.build_adapted(config, model_id)
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
        adapted = fresh(model_id)
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

    gain: dict[tuple[str, str], list[float]] = {}
    transfer: dict[tuple[str, str], list[float]] = {}
    typer.echo(f"seed {seed}, scenario {scenario}, {steps} steps, lr-pq {config.lr_pq}, r {config.r}, A/B {bases}")
    for ref in tasks:
        trained = {x: train_pq(x, ref) for x in models}
        for y in models:
            target = fresh(y)
            base = accuracy(target, ref)
            scores = {}
            for x in models:
                target.model.load_local_state(shared=trained[x])
                scores[x] = accuracy(target, ref)
            own = scores[y] - base
            line = []
            for x in models:
                gain.setdefault((x, y), []).append(scores[x] - base)
                if own > 0.02:  # a ratio only where Y's own training helped
                    transfer.setdefault((x, y), []).append((scores[x] - base) / own)
                line.append(f"{x} {100 * scores[x]:.1f}")
            typer.echo(f"{ref.key:16s} target {y:13s} base {100 * base:.1f} | " + " | ".join(line), err=True)

    typer.echo("\n| source → target | accuracy gain over the base (points) | transfer (gain / own gain) | tasks |")
    typer.echo("|---|---:|---:|---:|")
    for (x, y), values in sorted(gain.items(), key=lambda kv: (kv[0][1], kv[0][0] != kv[0][1], kv[0][0])):
        ratio = transfer.get((x, y), [])
        typer.echo(f"| {x} → {y} | {100 * np.mean(values):+.1f} | {np.mean(ratio) if ratio else float('nan'):.2f} | {len(values)} |")


if __name__ == "__main__":
    app()
