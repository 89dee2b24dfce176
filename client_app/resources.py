"""What a ClientApp process loads once and reuses across messages: scenario, data, models.

In simulation the ClientApp lives in a Ray actor that serves *several* clients, and possibly
several runs, in turn. So nothing here holds a client's own state or a run's training settings:
data is cached per data root and scenario, models per model id and the settings that build them
(quantization, seed, r, alpha, dropout, A/B alignment); every round restores the client's
adapter from its state directory and trains with the config of the run it serves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client_app.state import adapter_snapshot
from drake_data.layout import Scenario, TaskRef, load_task
from drake_data.mini.builder import load_unseen
from drake_data.prompts import RenderedSample, render_sample
from drake_data.streams import sample_key
from fedmosaic_core.models.align import load_aligned_bases
from fedmosaic_core.models.loading import LoadedModel
from fedmosaic_core.pqlora import PQLoRAConfig, PQLoRAModel, inject_pqlora
from fedmosaic_core.rela import TaskVectorProbe
from fedmosaic_flower.config import FederationConfig
from fedmosaic_flower.prepare import (
    bases_dir,
    load_run_model,
    load_run_scenario,
    probe_model_id,
    resolve_data_root,
    smallest_model,
)

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
    data_root: Path
    scenario: Scenario
    models: dict[tuple[Any, ...], AdaptedModel] = field(default_factory=dict)
    probes: dict[tuple[Any, ...], tuple[LoadedModel, TaskVectorProbe]] = field(default_factory=dict)
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
        """The first ``max_test`` samples of a task's test split (0: all; unseen tasks have only this)."""
        key = (ref.key, f"test-{max_test}")
        if key not in self.tests:
            records = load_task(self.data_root, ref.dataset, ref.subset_id, "test")
            records = records[:max_test] if max_test else records
            self.tests[key] = [render_sample(r, self.data_root, ref.type) for r in records]
        return self.tests[key]

    def unseen_tasks(self) -> list[TaskRef]:
        path = self.data_root / "unseen.json"
        return load_unseen(self.data_root) if path.exists() else []

    # ------------------------------------------------------------------ models
    def adapted(self, config: FederationConfig, model_id: str) -> AdaptedModel:
        """``model_id`` with PQ-LoRA injected (and its aligned A/B), built once per settings."""
        key = (model_id, config.quantization, config.seed, config.pretrained, config.r, config.alpha,
               config.dropout, config.align_bases, config.gradient_checkpointing)
        if key not in self.models:
            self.models[key] = self.build_adapted(config, model_id)
        return self.models[key]

    def build_adapted(self, config: FederationConfig, model_id: str) -> AdaptedModel:
        """A new, uncached :meth:`adapted` model (for a caller that changes it for good, e.g. a merge)."""
        loaded = load_run_model(config, model_id, self.data_root)
        model = inject_pqlora(
            loaded.model, PQLoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, seed=config.seed)
        )
        if config.gradient_checkpointing:
            model.enable_activation_checkpointing()
        arch = loaded.fingerprint.with_rank(config.r).id
        folder = bases_dir(config, smallest_model([c.model_id for c in self.scenario.clients]), self.data_root)
        if config.align_bases and (folder / f"{arch}.safetensors").is_file():
            load_aligned_bases(model, folder)
            log.info("loaded aligned A/B for %s from %s", model_id, folder)
        else:
            log.info("%s: seeded orthonormal A/B (no alignment file in %s)", model_id, folder)
        return AdaptedModel(loaded, model, adapter_snapshot(model), arch)

    def probe(self, config: FederationConfig) -> tuple[LoadedModel, TaskVectorProbe]:
        """The frozen probe model of the run (adapters off) and its task-vector probe."""
        model_id = probe_model_id(config, self.scenario)
        key = (model_id, config.quantization, config.seed, config.pretrained)
        if key not in self.probes:
            loaded = load_run_model(config, model_id, self.data_root)
            loaded.model.eval()
            for p in loaded.model.parameters():
                p.requires_grad_(False)
            self.probes[key] = (loaded, TaskVectorProbe(loaded.model))
        return self.probes[key]


_RESOURCES: dict[tuple[Any, ...], Resources] = {}


def get_resources(config: FederationConfig, data_root_override: str | None = None) -> Resources:
    """Process-wide cache of data and models (never of a run's training settings)."""
    data_root = Path(data_root_override) if data_root_override else resolve_data_root(config)
    torch.set_num_threads(config.torch_threads or (os.cpu_count() or 1))
    key = (data_root, config.scenario)
    if key not in _RESOURCES:
        _RESOURCES[key] = Resources(data_root, load_run_scenario(config, data_root))
    return _RESOURCES[key]


def clear_resources() -> None:
    """Drop every cached scenario, sample and model (a long-lived worker does at a new run)."""
    _RESOURCES.clear()
