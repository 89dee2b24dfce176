"""Does RELA's probe separate skills better without the closing eos? (issue 11 candidate)

The task vector is the probe model's closed-form gradient of the mean answer-token loss
(`fedmosaic_core.rela.probe`), and a DRAKE-mini answer is one word followed by the eos, so half
of the answer tokens are the format's. For every task of a scenario: the mean probe gradient over
``--samples`` training samples of the task, with every answer token (as the runs do) and with the
eos left out (its labels set to -100), each sanitised to the runs' kept rows and compressed with
the runs' sketch. Per variant: the AUROC of the task-level ``s_ij`` (same skill against the rest,
pairs of tasks), the same on the uncompressed vectors, and the share of the gradient's squared
norm that the eos positions carry.

    python bench/relevance_probe_tokens.py --cache DIR --seed 5 [--scenario two-families] [--samples 64]
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


def task_level_auroc(vectors: list[np.ndarray], skills: list[str]) -> float:
    from relevance_centring import pair_auroc  # bench/ is the script's folder, first on sys.path

    from fedmosaic_core.rela.similarity import task_similarity

    return pair_auroc(task_similarity(vectors), np.array([[a == b for b in skills] for a in skills]))


@app.command()
def main(
    cache: Path = typer.Option(None, help="FEDMOSAIC_CACHE (prepared if missing)"),
    seed: int = typer.Option(5, help="DRAKE-mini and preset seed"),
    scenario: str = typer.Option("two-families", help="whose tasks and probe model"),
    samples: int = typer.Option(64, help="training samples per task"),
    threads: int = typer.Option(1),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="run-config overrides, Flower's syntax"),
) -> None:
    if cache is not None:
        os.environ["FEDMOSAIC_CACHE"] = str(cache)
    torch.set_num_threads(threads)

    from client_app.resources import get_resources
    from client_app.training import upload_task_vector
    from fedmosaic_cli.comparison import task_skills
    from fedmosaic_cli.main import parse_overrides
    from fedmosaic_core.modeling import IGNORE_INDEX
    from fedmosaic_core.models.collate import collate
    from fedmosaic_core.rela.accumulator import selected_rows
    from fedmosaic_flower.config import parse_run_config
    from fedmosaic_flower.prepare import prepare_federation

    raw = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    config = parse_run_config({**raw, **parse_overrides(run_config), "seed": seed, "scenario": scenario,
                               "torch-threads": threads})
    data_root = prepare_federation(config)
    resources = get_resources(config, str(data_root))
    skill_of = task_skills(data_root)
    loaded, probe = resources.probe(config)
    eos = getattr(loaded.processor, "tokenizer", loaded.processor).eos_token_id
    tasks = [t for t in resources.scenario.tasks() if t.key in skill_of]
    if len(tasks) < 3:
        raise typer.BadParameter(f"{scenario}: fewer than 3 tasks with a skill in {data_root}/tasks.json")

    rows = selected_rows(probe.d_model, config.rows_fraction, config.seed)
    vectors: dict[str, list[torch.Tensor]] = {"every answer token": [], "eos left out": []}
    eos_share = []
    rng = random.Random(seed)
    for ref in tasks:
        ids = resources.train_ids(ref)
        chosen = rng.sample(ids, min(samples, len(ids)))
        sums = {name: torch.zeros(probe.d_model, probe.d_ff) for name in vectors}
        squared = {"all": 0.0, "eos": 0.0}
        batches = [chosen[i : i + config.batch_size] for i in range(0, len(chosen), config.batch_size)]
        for batch_ids in batches:
            batch = collate(loaded.processor, [resources.samples[i] for i in batch_ids], config.max_length)
            full = probe.gradient(batch)
            no_eos_labels = batch["labels"].masked_fill(batch["labels"] == eos, IGNORE_INDEX)
            n_all = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            n_kept = int((no_eos_labels[:, 1:] != IGNORE_INDEX).sum())
            kept = probe.gradient({**batch, "labels": no_eos_labels})
            # the eos positions' part of the (sum, not mean) gradient
            eos_part = full * n_all - kept * n_kept
            squared["all"] += float((full * n_all).pow(2).sum())
            squared["eos"] += float(eos_part.pow(2).sum())
            sums["every answer token"] += full
            sums["eos left out"] += kept
        for name in vectors:
            vectors[name].append(sums[name][rows] / len(batches))
        eos_share.append(squared["eos"] / squared["all"])
        typer.echo(f"{ref.key:18s} {skill_of[ref.key]:14s} eos share of ‖G‖² {eos_share[-1]:.3f}", err=True)

    skills = [skill_of[t.key] for t in tasks]
    typer.echo(f"seed {seed}, scenario {scenario}: {len(tasks)} tasks, {samples} samples each, probe "
               f"{type(loaded.model).__name__} (d_model {probe.d_model}, d_ff {probe.d_ff})\n")
    typer.echo("| answer tokens | task-level AUROC (sketch, as sent) | AUROC (uncompressed) |")
    typer.echo("|---|---:|---:|")
    for name, stack in vectors.items():
        sketched = [np.asarray(upload_task_vector(config, v)) for v in stack]
        typer.echo(f"| {name} | {task_level_auroc(sketched, skills):.3f} | "
                   f"{task_level_auroc([v.numpy() for v in stack], skills):.3f} |")
    typer.echo(f"\nShare of ‖G‖² from eos positions: mean {np.mean(eos_share):.3f}, "
               f"range {min(eos_share):.3f}-{max(eos_share):.3f}")


if __name__ == "__main__":
    app()
