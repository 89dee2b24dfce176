"""Local training of every scenario client under each choice of A/B (docs/method.md, "Aligning A and B across architectures").

For every client of the default scenario: its prepared tiny preset, PQ-LoRA injected with the
run's defaults (r, alpha, dropout, learning rates from pyproject.toml), ``--steps`` AdamW steps
(batch 8) on the first 64 train samples of the client's first task; answer loss on those 64
samples before and after. A/B variants for the non-anchor models: ``seeded`` (the model's own
seeded orthonormal A/B, no alignment), ``cca-raw`` (aligned A, B = T·B_a as in the reference) and
``cca-orthonormal`` (aligned A, B = nearest column-orthonormal matrix to T·B_a: the default). The
anchor keeps its seeded A/B in every variant.

    python bench/bench_alignment_training.py [--cache DIR] [--threads 1] [--steps 32]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomllib
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("seeded", "cca-raw", "cca-orthonormal")


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    cache: Path | None = typer.Option(None, help="FEDMOSAIC_CACHE (prepared if missing)"),
    threads: int = typer.Option(1, help="torch threads"),
    steps: int = typer.Option(32, help="AdamW steps per client and variant"),
) -> None:
    """Answer loss before and after local training, per client and A/B variant."""
    if cache is not None:
        os.environ["FEDMOSAIC_CACHE"] = str(cache)
    torch.set_num_threads(threads)

    from client_app.resources import get_resources
    from fedmosaic_core.models.align import AlignConfig, align_bases
    from fedmosaic_flower.config import parse_run_config
    from fedmosaic_flower.prepare import (
        DrakePublicSplit,
        load_run_model,
        load_run_scenario,
        prepare_federation,
        smallest_model,
    )

    raw = dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    config = parse_run_config(raw)
    data_root = prepare_federation(config)
    scenario = load_run_scenario(config, data_root)
    resources = get_resources(config, str(data_root))
    anchor_name = smallest_model([c.model_id for c in scenario.clients])
    anchor = load_run_model(config, anchor_name, data_root, quantization="none")
    public = DrakePublicSplit(data_root).samples()

    bases: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for model_id in sorted({c.model_id for c in scenario.clients} - {anchor_name}):
        other = load_run_model(config, model_id, data_root, quantization="none")
        bases[model_id] = {}
        for name, norm in (("cca-raw", "none"), ("cca-orthonormal", "orthonormal")):
            aligned = align_bases(anchor, other, public, AlignConfig(r=config.r, seed=config.seed, b_normalisation=norm))
            bases[model_id][name] = aligned.state

    print(f"threads {threads}, {steps} steps, lr-pq {config.lr_pq}, lr-lora {config.lr_lora}, r {config.r}")
    print("| client | model | task | loss before | after: seeded A/B | after: CCA raw B | after: CCA orthonormal B |")
    print("|---|---|---|---:|---:|---:|---:|")
    for entry in scenario.clients:
        ref = entry.datasets[0]
        samples = [resources.samples[i] for i in resources.train_ids(ref)[:64]]
        before, after = 0.0, dict[str, float]()
        for variant in VARIANTS:
            state = bases.get(entry.model_id, {}).get(variant)
            if variant != "seeded" and state is None:  # the anchor: same A/B in every variant
                after[variant] = after["seeded"]
                continue
            before, after[variant] = train_and_measure(entry.model_id, state, samples, config, steps, data_root)
        print(f"| {entry.client_id} | {entry.model_id} | {ref.key} | {before:.2f} | {after['seeded']:.2f} | "
              f"{after['cca-raw']:.2f} | {after['cca-orthonormal']:.2f} |", flush=True)


def train_and_measure(model_id: str, state: dict[str, torch.Tensor] | None, samples: list[Any],
                      config: Any, steps: int, data_root: Path) -> tuple[float, float]:
    """(answer loss before, after ``steps`` local steps) on ``samples``."""
    from client_app.training import local_optimizer
    from fedmosaic_core.models.collate import collate
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora
    from fedmosaic_flower.prepare import load_run_model

    loaded = load_run_model(config, model_id, data_root, quantization="none")
    model = inject_pqlora(loaded.model, PQLoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout,
                                                     seed=config.seed))
    if state is not None:
        model.load_pq_bases(state)
    processor = loaded.processor

    def loss_on_all() -> float:
        model.eval()
        with torch.no_grad():
            losses = [float(model(**collate(processor, samples[i : i + 8], config.max_length)).loss)
                      for i in range(0, len(samples), 8)]
        model.train()
        return sum(losses) / len(losses)

    before = loss_on_all()
    optimizer = local_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    for _ in range(steps):
        batch = [samples[j] for j in torch.randint(0, len(samples), (8,), generator=generator).tolist()]
        model(**collate(processor, batch, config.max_length)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, loss_on_all()


if __name__ == "__main__":
    app()
