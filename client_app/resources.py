"""What a ClientApp process loads once and reuses across messages: scenario, data, models.

In simulation the ClientApp lives in a Ray actor that serves *several* clients in turn, so nothing
here holds a client's own state: models are cached per model id with their freshly injected
adapter, and every round restores the client's adapter from its state directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drake_data.layout import Scenario, TaskRef, load_task
from drake_data.mini.builder import load_unseen
from drake_data.prompts import RenderedSample, render_sample
from drake_data.streams import sample_key
from fedmosaic_core.federation.config import FederationConfig
from fedmosaic_core.federation.prepare import (
    bases_dir,
    load_run_scenario,
    probe_model_id,
    resolve_data_root,
    smallest_model,
)
from fedmosaic_core.models.align import load_aligned_bases
from fedmosaic_core.models.loading import LoadedModel, load_model
from fedmosaic_core.pqlora import PQLoRAConfig, PQLoRAModel, inject_pqlora
from fedmosaic_core.rela import TaskVectorProbe

log = logging.getLogger("fedmosaic.client")


@dataclass
class AdaptedModel:
    """A base model with PQ-LoRA injected, and the adapter's initial state (for new clients)."""

    loaded: LoadedModel
    model: PQLoRAModel
    initial: dict[str, torch.Tensor]
    arch: str


@dataclass
class Resources:
    config: FederationConfig
    data_root: Path
    scenario: Scenario
    models: dict[str, AdaptedModel] = field(default_factory=dict)
    probes: dict[str, tuple[LoadedModel, TaskVectorProbe]] = field(default_factory=dict)
    samples: dict[str, RenderedSample] = field(default_factory=dict)
    tasks: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    tests: dict[tuple[str, str], list[RenderedSample]] = field(default_factory=dict)

    # ------------------------------------------------------------------ data
    def train_ids(self, ref: TaskRef) -> list[str]:
        """Sample ids of a task's train split (rendered once and cached)."""
        key = (ref.key, "train")
        if key not in self.tasks:
            ids = []
            for record in load_task(self.data_root, ref.dataset, ref.subset_id, "train"):
                sid = sample_key(ref.dataset, ref.subset_id, str(record["id"]))
                self.samples[sid] = render_sample(record, self.data_root, ref.type)
                ids.append(sid)
            self.tasks[key] = ids
        return list(self.tasks[key])

    def test_samples(self, ref: TaskRef, max_test: int) -> list[RenderedSample]:
        """The first ``max_test`` samples of a task's test split (unseen tasks have only this)."""
        key = (ref.key, f"test-{max_test}")
        if key not in self.tests:
            records = load_task(self.data_root, ref.dataset, ref.subset_id, "test")[:max_test]
            self.tests[key] = [render_sample(r, self.data_root, ref.type) for r in records]
        return self.tests[key]

    def unseen_tasks(self) -> list[TaskRef]:
        path = self.data_root / "unseen.json"
        return load_unseen(self.data_root) if path.exists() else []

    # ------------------------------------------------------------------ models
    def adapted(self, model_id: str) -> AdaptedModel:
        if model_id not in self.models:
            cfg = self.config
            loaded = load_model(
                model_id, quantization=cfg.quantization, seed=cfg.seed,
                public_data_root=self.data_root, random_init=not cfg.pretrained,
            )
            model = inject_pqlora(
                loaded.model, PQLoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, seed=cfg.seed)
            )
            arch = loaded.fingerprint.with_rank(cfg.r).id
            folder = bases_dir(cfg, smallest_model([c.model_id for c in self.scenario.clients]))
            if cfg.align_bases and (folder / f"{arch}.safetensors").is_file():
                load_aligned_bases(model, folder)
                log.info("loaded aligned A/B for %s from %s", model_id, folder)
            else:
                log.info("%s: seeded orthonormal A/B (no alignment file in %s)", model_id, folder)
            self.models[model_id] = AdaptedModel(
                loaded, model, adapter_snapshot(model), loaded.fingerprint.with_rank(cfg.r).id
            )
        return self.models[model_id]

    def probe(self) -> tuple[LoadedModel, TaskVectorProbe]:
        model_id = probe_model_id(self.config, self.scenario)
        if model_id not in self.probes:
            loaded = load_model(
                model_id, quantization=self.config.quantization, seed=self.config.seed,
                public_data_root=self.data_root, random_init=not self.config.pretrained,
            )
            loaded.model.eval()
            for p in loaded.model.parameters():
                p.requires_grad_(False)
            self.probes[model_id] = (loaded, TaskVectorProbe(loaded.model))
        return self.probes[model_id]


def adapter_snapshot(model: PQLoRAModel) -> dict[str, torch.Tensor]:
    """Both branches and the gates as one flat dict (``local/…``, ``global/…``, ``gate/…``)."""
    out: dict[str, torch.Tensor] = {}
    for branch in ("local", "global"):
        for key, value in {**model.shared_state(branch), **model.same_arch_state(branch)}.items():
            out[f"{branch}/{key}"] = value
    for key, value in model.local_only_state().items():
        out[f"gate/{key}"] = value
    return out


def restore_adapter(model: PQLoRAModel, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Inverse of :func:`adapter_snapshot` (validated by the adapter before anything is written)."""
    def part(name: str) -> dict[str, torch.Tensor]:
        head = f"{prefix}{name}/"
        return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}

    local, global_, gates = part("local"), part("global"), part("gate")
    shared_keys = set(model.shared_state("local"))
    model.load_local_state(
        shared={k: v for k, v in local.items() if k in shared_keys},
        same_arch={k: v for k, v in local.items() if k not in shared_keys},
        local_only=gates,
    )
    model.load_global_state(
        shared={k: v for k, v in global_.items() if k in shared_keys},
        same_arch={k: v for k, v in global_.items() if k not in shared_keys},
    )


_RESOURCES: dict[tuple[Any, ...], Resources] = {}


def get_resources(config: FederationConfig, data_root_override: str | None = None) -> Resources:
    """Process-wide cache keyed by what determines the resources."""
    data_root = Path(data_root_override) if data_root_override else resolve_data_root(config)
    key = (data_root, config.scenario, config.seed, config.r, config.alpha, config.dropout,
           config.quantization, config.probe_model, config.eval_max_samples, config.pretrained)
    if key not in _RESOURCES:
        threads = config.torch_threads or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        _RESOURCES[key] = Resources(config, data_root, load_run_scenario(config, data_root))
    return _RESOURCES[key]
