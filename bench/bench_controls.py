"""Controls that show whether DRAKE-mini measures skill, per client task.

* **chance**: the mean of 1/|options| over the task's test questions;
* **format-only**: a uniformly random option (seeded), what a model that knows only the answer
  format scores;
* **best constant**: the best single answer string for the task's test questions;
* **trained / blind**: each client's final model from a finished run (its last saved adapter),
  scored as the run scores it, on its own tasks' test questions: with the real images, and with
  every image replaced by a uniform grey one (a blind model: what the question text alone gives);
* **generated** (with ``--generation``): the trained model scored by generated text and answer
  extraction instead, with the share of replies that name no option (**unparsable**).

    python bench/bench_controls.py RUN_DIR [--json OUT] [--generation]
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from client_app.evaluation import score_samples
from client_app.export import open_finished_client
from client_app.resources import get_resources
from drake_data.answers import gold_index
from drake_data.metrics import chance_level
from fedmosaic_flower.config import parse_run_config

app = typer.Typer(add_completion=False)


def blanked(sample):  # type: ignore[no-untyped-def]
    return dataclasses.replace(sample, images=[Image.new("RGB", im.size, (128, 128, 128)) for im in sample.images])


@app.command()
def main(
    run_dir: Path,
    json_out: Path | None = typer.Option(None, "--json"),
    generation: bool = typer.Option(False, "--generation", help="also score by generated text"),
) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    config = parse_run_config({k.replace("_", "-"): v for k, v in saved.items()})
    torch.set_num_threads(config.torch_threads or 1)
    resources = get_resources(config)
    rng = np.random.default_rng(0)
    rows = []
    columns = ["chance", "format_only", "best_constant", "trained", "blind"] + (["generated", "unparsable"] if generation else [])
    typer.echo("| client | model | task | " + " | ".join(c.replace("_", "-") for c in columns) + " |\n"
               + "|---" * (3 + len(columns)) + "|")
    for entry in resources.scenario.clients:
        cid = str(entry.client_id)
        adapted = open_finished_client(run_dir, cid).adapted  # its adapter of the last round it completed
        adapted.model.eval()
        for ref in entry.datasets:
            samples = resources.test_samples(ref, config.eval_max_samples)
            golds = [gold_index(s) for s in samples]
            random_pick = float(np.mean([rng.integers(len(s.choices or [])) == g for s, g in zip(samples, golds, strict=True)]))
            constant = max(Counter(s.answer for s in samples).values()) / len(samples)
            kwargs = {"scoring": config.scoring, "max_length": config.max_length, "max_new_tokens": config.max_new_tokens}
            trained = score_samples(adapted.model, adapted.loaded.processor, samples, **kwargs).score
            blind = score_samples(adapted.model, adapted.loaded.processor, [blanked(s) for s in samples], **kwargs).score
            row = {"client": cid, "model_id": entry.model_id, "task": ref.key, "chance": chance_level([s.choices for s in samples]),
                   "format_only": random_pick, "best_constant": constant, "trained": trained, "blind": blind}
            if generation:
                generated = score_samples(adapted.model, adapted.loaded.processor, samples,
                                          **{**kwargs, "scoring": "generation"})
                row |= {"generated": generated.score, "unparsable": generated.unparsable / max(1, generated.samples)}
            rows.append(row)
            typer.echo(f"| {cid} | {entry.model_id} | {ref.key} | " + " | ".join(f"{100 * row[k]:.1f}" for k in columns) + " |")
    if json_out:
        json_out.write_text(json.dumps({"run_dir": str(run_dir), "rows": rows}, indent=1))


if __name__ == "__main__":
    app()
