"""One FedMosaic client round: restore state, load G_i, train, probe, evaluate, save, reply.

Per round ``t`` (DESIGN §5): restore the state saved after round ``t-1``; load the received global
state into the frozen global branch; add the round's stream chunk to the replay memory; train the
local branch and the gate for ``local-steps`` steps on replayed batches (AdamW; P/Q and gates at
``lr-pq``, plain LoRA A/B at ``lr-lora``); every ``probe-every`` steps run the probe on the batch
and add the sanitised gradient to the task-vector accumulator; smooth and compress the task vector;
evaluate Self (and Others/unseen when asked); save the state of round ``t``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from client_app.resources import Resources, adapter_snapshot, restore_adapter
from client_app.state import (
    ClientSnapshot,
    ClientStateStore,
    optimizer_from_snapshot,
    optimizer_to_snapshot,
)
from drake_data.answers import score_sample
from drake_data.layout import ScenarioEntry, TaskRef
from drake_data.streams import ReplayMemory, Stream, build_stream
from fedmosaic_core.federation.config import FederationConfig
from fedmosaic_core.models.collate import collate, generate_answers
from fedmosaic_core.pqlora import PQLoRAModel
from fedmosaic_core.rela import TaskVectorAccumulator, TaskVectorCompression, compress_task_vector

log = logging.getLogger("fedmosaic.client")

EVAL_BATCH = 16


def derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def upload_task_vector(config: FederationConfig, smoothed: torch.Tensor) -> np.ndarray:
    """The task vector as sent: raw (``tv-compression = 1``) or the shared-seed sketch that is
    ``tv-compression``× smaller (same plan on every client)."""
    if config.tv_compression <= 1:
        return smoothed.detach().cpu().float().numpy()
    rows, cols = smoothed.shape
    sketch = TaskVectorCompression.for_shape(
        rows, cols, min_ratio=config.tv_compression, sketch_dim=config.tv_sketch_dim, seed=config.seed
    )
    return compress_task_vector(smoothed, sketch)


def local_optimizer(model: PQLoRAModel, config: FederationConfig) -> torch.optim.AdamW:
    """AdamW over the trainable adapter: P/Q and the gates at ``lr-pq``, plain LoRA at ``lr-lora``."""
    groups = model.parameter_groups()
    return torch.optim.AdamW(
        [
            {"params": groups["pq"], "lr": config.lr_pq},
            {"params": groups["gate"], "lr": config.lr_pq},
            {"params": groups["lora"], "lr": config.lr_lora},
        ],
        weight_decay=config.weight_decay,
    )


@dataclass
class RoundResult:
    local_shared: dict[str, torch.Tensor]
    local_same_arch: dict[str, torch.Tensor]
    task_vector: np.ndarray | None
    metrics: dict[str, float]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


class FedMosaicClient:
    """A client bound to its scenario entry, its model and its state directory."""

    def __init__(self, resources: Resources, client_id: str, state_root: Path) -> None:
        self.res = resources
        self.config = resources.config
        self.client_id = client_id
        try:
            self.entry: ScenarioEntry = resources.scenario.client(int(client_id))
        except ValueError:
            raise ValueError(f"client id {client_id!r} is not an integer client_id of the scenario") from None
        self.state_root = state_root

    # ------------------------------------------------------------------ handshake
    def info(self) -> dict[str, Any]:
        adapted = self.res.adapted(self.entry.model_id)
        return {
            "arch": adapted.arch,
            "model-id": self.entry.model_id,
            "schema": {
                "shared": {k: list(v.shape) for k, v in adapted.model.shared_state().items()},
                "same-arch": {k: list(v.shape) for k, v in adapted.model.same_arch_state().items()},
            },
        }

    # ------------------------------------------------------------------ data
    def _stream(self) -> Stream:
        tasks = [(ref.key, self.res.train_ids(ref)) for ref in self.entry.datasets]
        return build_stream(tasks, self.config.stream_mode, self.config.rounds_per_task, self.config.seed + int(self.client_id))

    # ------------------------------------------------------------------ round
    def run_round(
        self,
        server_round: int,
        global_shared: dict[str, torch.Tensor] | None,
        global_same_arch: dict[str, torch.Tensor] | None,
        *,
        eval_others: bool,
        eval_unseen: bool,
        run_name: str,
    ) -> RoundResult:
        cfg = self.config
        started = time.monotonic()
        adapted = self.res.adapted(self.entry.model_id)
        model = adapted.model
        store = ClientStateStore(self.state_root, run_name, self.client_id)
        snapshot = store.load(server_round - 1)

        # -- restore everything this client carries across rounds
        restore_adapter(model, snapshot.tensors if snapshot else adapted.initial, "adapter/" if snapshot else "")
        stream = self._stream()
        memory = ReplayMemory(seed=derived_seed(cfg.seed, self.client_id, "replay"))
        probe_loaded, probe = self.res.probe()
        accumulator = TaskVectorAccumulator(
            probe, rows_fraction=cfg.rows_fraction, noise_std=cfg.noise_std,
            every_m_steps=cfg.probe_every, seed=cfg.seed,
            noise_seed=derived_seed(cfg.seed, self.client_id, "noise"),
        )
        groups = model.parameter_groups()
        named = {id(p): f"{g}.{i}" for g, params in groups.items() for i, p in enumerate(params)}
        optimizer = local_optimizer(model, cfg)
        if snapshot is not None:
            meta = snapshot.meta
            stream.load_state_dict(meta["stream"])
            memory.load_state_dict(meta["replay"])
            optimizer_from_snapshot(optimizer, named, snapshot.tensors, meta["optimizer"])
            tv_tensors = {k[3:]: v for k, v in snapshot.tensors.items() if k.startswith("tv/")}
            accumulator.load_state_dict(tv_tensors, meta["task_vector"])
        if global_shared is not None or global_same_arch is not None:
            model.load_global_state(shared=global_shared or None, same_arch=global_same_arch or None)

        # -- this round's data enters the replay memory
        if stream.position < stream.num_rounds:
            memory.add(stream.next_chunk())
        round_index = stream.position - 1

        # -- local training
        torch.manual_seed(derived_seed(cfg.seed, self.client_id, server_round))
        processor = adapted.loaded.processor
        model.train()
        losses: list[float] = []
        for step in tqdm(range(cfg.local_steps), desc=f"client {self.client_id} round {server_round}",
                         leave=False, mininterval=5.0, disable=None):
            ids = memory.sample(cfg.batch_size)
            samples = [self.res.samples[i] for i in ids]
            batch = collate(processor, samples, cfg.max_length)
            output = model(**batch)
            loss = output.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {self.client_id}: non-finite loss at step {step}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % cfg.probe_every == 0 and cfg.strategy == "fedmosaic":
                accumulator.add(probe.gradient(collate(probe_loaded.processor, samples, cfg.max_length)))
        train_time = time.monotonic() - started

        # -- task vector (only RELA needs it)
        task_vector = None
        if cfg.strategy == "fedmosaic":
            smoothed = accumulator.end_round()
            task_vector = upload_task_vector(cfg, smoothed)

        # -- evaluation
        model.eval()
        scores = {"self": self._evaluate(stream.tasks_started(round_index), own=True)}
        if eval_others:
            owner = self.res.scenario.task_owner()
            others = [t for t in self.res.scenario.tasks() if owner[t.key] != int(self.client_id)]
            scores["others"] = self._evaluate_refs(others)
        if eval_unseen:
            scores["unseen"] = self._evaluate_refs(self.res.unseen_tasks())
        model.train()

        # -- save the state of this round
        tensors = {f"adapter/{k}": v for k, v in adapter_snapshot(model).items()}
        optim_tensors, optim_meta = optimizer_to_snapshot(optimizer, named)
        tv_tensors, tv_meta = accumulator.state_dict()
        tensors.update(optim_tensors)
        tensors.update({f"tv/{k}": v for k, v in tv_tensors.items()})
        store.save(
            server_round,
            ClientSnapshot(
                tensors,
                {
                    "round": server_round,
                    "stream": stream.state_dict(),
                    "replay": memory.state_dict(),
                    "optimizer": optim_meta,
                    "task_vector": tv_meta,
                },
            ),
        )
        metrics = {
            "train-loss": float(np.mean(losses)) if losses else math.nan,
            "train-steps": float(len(losses)),
            "train-time-s": train_time,
            "round-time-s": time.monotonic() - started,
            "replay-size": float(len(memory)),
        }
        log.info("client %s round %d: loss %.3f, self %s, %.1fs", self.client_id, server_round,
                 metrics["train-loss"], _mean_str(scores["self"]), metrics["round-time-s"])
        return RoundResult(model.shared_state(), model.same_arch_state(), task_vector, metrics, scores)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, task_keys: list[str], own: bool) -> dict[str, float]:
        refs = [r for r in self.entry.datasets if r.key in set(task_keys)]
        return self._evaluate_refs(refs)

    def _evaluate_refs(self, refs: list[TaskRef]) -> dict[str, float]:
        adapted = self.res.adapted(self.entry.model_id)
        out: dict[str, float] = {}
        for ref in refs:
            samples = self.res.test_samples(ref, self.config.eval_max_samples)
            if not samples:
                continue
            total = 0.0
            for start in range(0, len(samples), EVAL_BATCH):
                chunk = samples[start : start + EVAL_BATCH]
                answers = generate_answers(
                    adapted.model, adapted.loaded.processor, chunk,
                    max_new_tokens=self.config.max_new_tokens, max_length=self.config.max_length,
                )
                total += sum(score_sample(a, s) for a, s in zip(answers, chunk, strict=True))
            out[ref.key] = total / len(samples)
        return out


def _mean_str(scores: dict[str, float]) -> str:
    return f"{100 * float(np.mean(list(scores.values()))):.1f}%" if scores else "—"
