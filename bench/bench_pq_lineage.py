"""Does a P/Q transfer between models that share a lineage? The premise of PQ-LoRA, one step on.

``bench_pq_transfer.py`` finds that a P/Q trained in one tiny preset does nothing in another: those
presets are pretrained independently, from their own random initialisations. Real model families
are not: Llama-3.2-1B and -3B were pruned from Llama-3.1-8B and distilled from it, and an
instruct model is its base trained further. This bench separates the two causes, architecture
and independent training, with four relatives of the seed's pretrained ``tiny-llama-m`` (the
parent), built here from the same public split and the same pretraining recipe:

- ``continued``: the parent trained ``--derive-steps`` more steps on the public split (another
  sample order): same architecture, same lineage (a base and its instruct model);
- ``pruned``: the parent with every second decoder layer (the last one kept: 8 → 4 layers, so its
  PQ layers are four of the parent's), then trained ``--derive-steps`` steps: another
  architecture, same lineage (1B pruned from 8B);
- ``sibling``: ``tiny-llama-m`` pretrained from another random initialisation and sample order
  (seed + 1000), the full recipe: same architecture, independent training;
- ``tiny-llama-s``: the shipped small preset of the seed: another architecture, independent.

Then, as ``bench_pq_transfer.py`` does, P/Q alone are trained in each model on the first task of
each client of the two-families scenario and scored in every model. A/B: ``--bases seeded``
gives every model the run's seeded orthonormal A/B (identical in all the width-96 models);
``--bases aligned`` aligns each model to the anchor (the smallest, ``tiny-llama-s``, as the run
picks it; ``--anchor NAME`` picks another, e.g. ``pruned``, as a run of the parent and its pruned
relative alone would) as the run does, but per model, not per architecture (the run keys its A/B
by architecture, so there the parent and its sibling would get the same A/B).

    python bench/bench_pq_lineage.py --cache DIR --work DIR --seed 5 [--bases seeded|aligned] [--out cells.json]
    python bench/bench_pq_lineage.py --cache DIR --work DIR --seed 5 --bases aligned --anchor pruned
    python bench/bench_pq_lineage.py --cache DIR --work DIR --seed 5 --bases aligned --only-bases
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tomllib
import torch
import typer
from bench_pq_transfer import measure_transfer, print_table  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
PARENT = "tiny-llama-m"
OTHER = "tiny-llama-s"
RELATIVE_SEED = 1000
app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def keep_layers(model: torch.nn.Module, keep: list[int]) -> None:
    """Drop every decoder layer not in ``keep`` (in place) and renumber the rest."""
    decoder = model.get_decoder()
    kept = [decoder.layers[i] for i in keep]
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    decoder.layers = torch.nn.ModuleList(kept)
    text = model.config.get_text_config()
    text.num_hidden_layers = len(kept)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[i] for i in keep]


def derive(parent: Path, out: Path, samples: list, steps: int, seed: int, prune: bool) -> Path:
    """The parent (with ``prune``, only its odd-numbered decoder layers, the last one included)
    trained ``steps`` more steps; cached in ``out``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from fedmosaic_core.models.pretrain import (
        PretrainConfig,
        answer_accuracy,
        pretrain,
        split_held_out,
    )
    from fedmosaic_core.storage import atomic_build_dir, atomic_write_json

    if (out / "prepare.json").is_file():
        return out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration.from_pretrained(parent)
        processor = AutoProcessor.from_pretrained(parent)
        keep = None
        if prune:
            keep = list(range(1, len(model.get_decoder().layers), 2))
            keep_layers(model, keep)
        config = PretrainConfig(steps=steps)
        train, held_out = split_held_out(samples, config.held_out_fraction, seed)
        before = answer_accuracy(model, processor, held_out, config.max_length)
        timing = pretrain(model, processor, train, config, seed)
        after = answer_accuracy(model, processor, held_out, config.max_length)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "prepare.json", {"parent": str(parent), "kept_layers": keep, "steps": steps,
                                                 "seed": seed, "before": {"held_out_accuracy": before},
                                                 "after": {"held_out_accuracy": after},
                                                 **timing})

    atomic_build_dir(out, save)
    return out


def print_bases_agreement(ab: dict[str, dict[str, torch.Tensor]]) -> None:
    """For every two models with A/B of the same shapes: the mean cosine of matching rows of A and
    of matching columns of B over the PQ modules (1 for identical A/B, as the seeded ones are).
    P and Q act in these coordinates, so it is how alike a P/Q reads in the two models."""
    names = sorted(ab)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            if any(ab[x][k].shape != ab[y].get(k, torch.empty(0)).shape for k in ab[x]):
                continue
            rows = [torch.diagonal(ab[x][k] @ ab[y][k].T).mean().item() for k in ab[x] if k.endswith(".A")]
            cols = [torch.diagonal(ab[x][k].T @ ab[y][k]).mean().item() for k in ab[x] if k.endswith(".B")]
            typer.echo(f"A/B agreement {x} ~ {y}: A rows {sum(rows) / len(rows):.3f}, B columns {sum(cols) / len(cols):.3f}")


@app.command()
def main(
    cache: Path = typer.Option(..., help="FEDMOSAIC_CACHE (prepared if missing)"),
    work: Path = typer.Option(..., help="folder for the derived models (reused when present)"),
    seed: int = typer.Option(0, help="DRAKE-mini and preset seed"),
    steps: int = typer.Option(64, help="AdamW steps of P/Q per source model and task"),
    derive_steps: int = typer.Option(200, help="training steps of the continued and pruned relatives"),
    threads: int = typer.Option(1),
    bases: str = typer.Option("seeded", help="'seeded' (the run's seeded A/B, no alignment) or 'aligned' "
                                             "(each model aligned to the smallest)"),
    out: Path = typer.Option(None, help="write every (task, source, target) cell as JSON"),
    only_bases: bool = typer.Option(False, help="with --bases aligned: print how far the models' aligned A/B "
                                               "agree, then stop (no P/Q training)"),
    anchor: str = typer.Option("", help="with --bases aligned: the model the others are aligned to "
                                        "(default: the smallest, as in a run)"),
) -> None:
    if bases not in ("aligned", "seeded"):
        raise typer.BadParameter(f"--bases must be aligned or seeded, got {bases!r}")
    os.environ["FEDMOSAIC_CACHE"] = str(cache)
    torch.set_num_threads(threads)

    from client_app.resources import AdaptedModel, get_resources
    from client_app.state import adapter_snapshot
    from fedmosaic_core.models.align import (
        AlignConfig,
        align_bases,
        alignment_summary,
        anchor_aligned_bases,
    )
    from fedmosaic_core.models.pretrain import find_prepared, prepare_preset
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora
    from fedmosaic_flower.config import parse_run_config
    from fedmosaic_flower.prepare import (
        DrakePublicSplit,
        load_run_model,
        prepare_federation,
        smallest_model,
    )

    raw = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    config = parse_run_config({**raw, "seed": seed, "scenario": "two-families", "torch-threads": threads})
    data_root = prepare_federation(config)
    resources = get_resources(config, str(data_root))
    tasks = [c.datasets[0] for c in resources.scenario.clients]
    parent = find_prepared(PARENT, seed)
    if parent is None:
        raise typer.BadParameter(f"no prepared {PARENT} for seed {seed} under {cache}")
    samples = DrakePublicSplit(data_root).samples()
    folder = work / f"seed{seed}"
    models = {
        PARENT: PARENT,
        "continued": str(derive(parent, folder / "continued", samples, derive_steps, seed + RELATIVE_SEED, False)),
        "pruned": str(derive(parent, folder / "pruned", samples, derive_steps, seed + RELATIVE_SEED, True)),
        "sibling": str(prepare_preset(PARENT, samples, folder, seed + RELATIVE_SEED)),
        OTHER: OTHER,
    }
    for name, source in models.items():
        folder_of = Path(source) if source not in (PARENT, OTHER) else find_prepared(source, seed)
        info = json.loads((folder_of / "prepare.json").read_text())
        after = info["after"]["held_out_accuracy"]  # the presets' prepare.json fields
        typer.echo(f"{name:12s} public held-out answer accuracy after its training: {after:.3f}", err=True)

    loaded = {name: load_run_model(config, source, data_root, quantization="none") for name, source in models.items()}
    align = AlignConfig(r=config.r, seed=config.seed)
    ab: dict[str, dict[str, torch.Tensor]] = {}
    if bases == "aligned":
        by_source = {source: name for name, source in models.items()}
        if anchor and anchor not in models:
            raise typer.BadParameter(f"--anchor must be one of {sorted(models)}, got {anchor!r}")
        anchor = anchor or by_source[smallest_model(list(models.values()))]
        for name in models:
            if name == anchor:
                ab[name] = anchor_aligned_bases(loaded[anchor], align).state
            else:
                aligned = align_bases(loaded[anchor], loaded[name], samples, align)
                typer.echo(f"aligned {name} to {anchor}: {alignment_summary(aligned.metrics)}", err=True)
                ab[name] = aligned.state
        print_bases_agreement(ab)
        if only_bases:
            return

    def fresh(name: str) -> AdaptedModel:
        model_loaded = load_run_model(config, models[name], data_root)
        model = inject_pqlora(model_loaded.model, PQLoRAConfig(r=config.r, alpha=config.alpha,
                                                                dropout=config.dropout, seed=config.seed))
        if name in ab:
            model.load_pq_bases(ab[name])
        return AdaptedModel(model_loaded, model, adapter_snapshot(model), name)

    typer.echo(f"seed {seed}, {steps} steps, lr-pq {config.lr_pq}, r {config.r}, A/B {bases}")
    cells = measure_transfer(fresh, list(models), tasks, resources, config, steps, seed)
    print_table(cells)
    if out is not None:
        from fedmosaic_core.storage import atomic_write_json

        label = bases if bases == "seeded" else f"aligned to {anchor}"
        atomic_write_json(out, {"seed": seed, "bases": label, "steps": steps, "derive_steps": derive_steps,
                                "models": models, "cells": cells})


if __name__ == "__main__":
    app()
