"""One FedMosaic client round, step by step (docs/method.md, "One round").

Round ``t``: **restore** the state saved after round ``t-1``; **load the global** state into
the frozen global branch; the round's **stream** chunk enters the replay memory; **train** the
local branch and the gate for ``local-steps`` steps on replayed batches (AdamW; P/Q and gates at
``lr-pq``, plain LoRA A/B at ``lr-lora``), probing every ``probe-every`` steps; finish the **task
vector** (smooth, compress); **evaluate** Self (and Others/unseen when asked); **save** the state
of round ``t``. Every setting comes from the config of the run being served.
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

from client_app.evaluation import score_samples
from client_app.resources import AdaptedModel, Resources
from client_app.state import ClientStateStore, capture_state, restore_adapter, restore_state
from drake_data.layout import ScenarioEntry, TaskRef
from drake_data.streams import ReplayMemory, Stream, build_stream
from fedmosaic_core.models.collate import collate
from fedmosaic_core.models.loading import LoadedModel
from fedmosaic_core.models.scoring import answer_loss_mean
from fedmosaic_core.pqlora import PQLoRAModel
from fedmosaic_core.rela import (
    TaskVectorAccumulator,
    TaskVectorCompression,
    TaskVectorProbe,
    compress_task_vector,
)
from fedmosaic_flower.config import FederationConfig

log = logging.getLogger("fedmosaic.client")

MAX_GRAD_NORM = 1.0


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


@dataclass
class RoundState:
    """What one round works on: the client's model, optimizer, task-vector accumulator, stream
    and replay memory, restored from disk at the start and saved at the end."""

    adapted: AdaptedModel
    optimizer: torch.optim.AdamW
    names: dict[int, str]
    accumulator: TaskVectorAccumulator
    probe_model: LoadedModel
    probe: TaskVectorProbe
    stream: Stream
    memory: ReplayMemory
    store: ClientStateStore
    grad_norms: list[float] = field(default_factory=list)  # before clipping, one per step

    @property
    def model(self) -> PQLoRAModel:
        return self.adapted.model

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class FedMosaicClient:
    """A client bound to the run's config, its scenario entry, its model and its state directory."""

    def __init__(self, config: FederationConfig, resources: Resources, client_id: str, state_root: Path) -> None:
        self.config = config
        self.res = resources
        self.client_id = client_id
        try:
            self.entry: ScenarioEntry = resources.scenario.client(int(client_id))
        except ValueError:
            raise ValueError(f"client id {client_id!r} is not an integer client_id of the scenario") from None
        self.state_root = state_root

    def _adapted(self) -> AdaptedModel:
        return self.res.adapted(self.config, self.entry.model_id)

    # ------------------------------------------------------------------ handshake
    def info(self) -> dict[str, Any]:
        adapted = self._adapted()
        return {
            "arch": adapted.arch,
            "model-id": self.entry.model_id,
            "schema": {
                "shared": {k: list(v.shape) for k, v in adapted.model.shared_state().items()},
                "same-arch": {k: list(v.shape) for k, v in adapted.model.same_arch_state().items()},
            },
        }

    # ------------------------------------------------------------------ the round
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
        started = time.monotonic()
        state = self.restore(server_round, run_name)
        self.load_global(state, global_shared, global_same_arch)
        round_index = self.take_new_data(state)
        losses = self.train(state, server_round)
        betas = state.model.trained_beta_by_block(reset=True)
        train_time = time.monotonic() - started
        task_vector = self.task_vector(state)
        scores, unparsable = self.evaluate(state, round_index, eval_others=eval_others, eval_unseen=eval_unseen)
        self.save(state, server_round)
        metrics = {
            "train-loss": float(np.mean(losses)) if losses else math.nan,
            "train-steps": float(len(losses)),
            "train-time-s": train_time,
            "round-time-s": time.monotonic() - started,
            "replay-size": float(len(state.memory)),
            "grad-norm-max": max(state.grad_norms, default=math.nan),
            **{f"beta-block-{k}": beta for k, beta in betas.items()},  # mean gate value while training
        }
        if unparsable is not None:
            metrics["unparsable-rate"] = unparsable
        log.info("client %s round %d: loss %.3f, self %s, %.1fs", self.client_id, server_round,
                 metrics["train-loss"], _mean_str(scores["self"]), metrics["round-time-s"])
        return RoundResult(state.model.shared_state(), state.model.same_arch_state(), task_vector, metrics, scores)

    def restore(self, server_round: int, run_name: str) -> RoundState:
        """The state saved after the previous round (round 1: the freshly injected adapter)."""
        cfg = self.config
        adapted = self._adapted()
        store = ClientStateStore(self.state_root, run_name, self.client_id)
        snapshot = store.load(server_round - 1)
        tasks = [(ref.key, self.res.train_ids(ref)) for ref in self.entry.datasets]
        stream = build_stream(tasks, cfg.stream_mode, cfg.rounds_per_task, cfg.seed + int(self.client_id))
        memory = ReplayMemory(seed=derived_seed(cfg.seed, self.client_id, "replay"))
        probe_model, probe = self.res.probe(cfg)
        accumulator = TaskVectorAccumulator(
            probe, rows_fraction=cfg.rows_fraction, noise_std=cfg.noise_std,
            every_m_steps=cfg.probe_every, seed=cfg.seed,
            noise_seed=derived_seed(cfg.seed, self.client_id, "noise"),
        )
        groups = adapted.model.parameter_groups()
        names = {id(p): f"{g}.{i}" for g, params in groups.items() for i, p in enumerate(params)}
        optimizer = local_optimizer(adapted.model, cfg)
        adapted.model.set_fixed_beta(cfg.fixed_beta if cfg.fixed_beta >= 0 else None)
        if snapshot is None:
            restore_adapter(adapted.model, adapted.initial)
        else:
            restore_state(snapshot, adapted.model, optimizer, names, accumulator, stream, memory)
        return RoundState(adapted, optimizer, names, accumulator, probe_model, probe, stream, memory, store)

    def load_global(
        self, state: RoundState, shared: dict[str, torch.Tensor] | None, same_arch: dict[str, torch.Tensor] | None
    ) -> None:
        """The server's G_i into the frozen global branch (validated before anything is written).
        Under ``fedavg`` it is the architecture group's mean and replaces the local branch instead:
        one adapter, as in FedAvg; the global branch stays 0, so the gate rests as in ``local``."""
        if shared is None and same_arch is None:
            return
        if self.config.strategy == "fedavg":
            state.model.load_local_state(shared=shared or None, same_arch=same_arch or None)
        else:
            state.model.load_global_state(shared=shared or None, same_arch=same_arch or None)

    def take_new_data(self, state: RoundState) -> int:
        """This round's stream chunk enters the replay memory; returns the stream round index."""
        if state.stream.position < state.stream.num_rounds:
            state.memory.add(state.stream.next_chunk())
        return state.stream.position - 1

    def train(self, state: RoundState, server_round: int) -> list[float]:
        """``local-steps`` AdamW steps on replayed batches; the probe every ``probe-every`` steps."""
        cfg = self.config
        torch.manual_seed(derived_seed(cfg.seed, self.client_id, server_round))
        processor = state.adapted.loaded.processor
        state.model.train()
        state.model.trained_beta_by_block(reset=True)  # count this round's β only
        resting_gates = state.model.gates_without_global() if cfg.gate_rest_without_global else []
        losses: list[float] = []
        for step in tqdm(range(cfg.local_steps), desc=f"client {self.client_id} round {server_round}",
                         leave=False, mininterval=5.0, disable=None):
            samples = [self.res.samples[i] for i in state.memory.sample(cfg.batch_size)]
            loss = answer_loss_mean(state.model, collate(processor, samples, cfg.max_length))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {self.client_id}: non-finite loss at step {step}")
            loss.backward()
            for gate in resting_gates:
                gate.grad = None
            state.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(state.trainable, MAX_GRAD_NORM)))
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step % cfg.probe_every == 0 and cfg.strategy == "fedmosaic":
                batch = collate(state.probe_model.processor, samples, cfg.max_length)
                state.accumulator.add(state.probe.gradient(batch))
        return losses

    def task_vector(self, state: RoundState) -> np.ndarray | None:
        """The round's smoothed, compressed task vector (only RELA needs one)."""
        if self.config.strategy != "fedmosaic":
            return None
        return upload_task_vector(self.config, state.accumulator.end_round())

    def evaluate(
        self, state: RoundState, round_index: int, *, eval_others: bool, eval_unseen: bool
    ) -> tuple[dict[str, dict[str, float]], float | None]:
        """Self on the tasks started so far; Others (every other client's tasks) and unseen tasks
        when the round asks for them. Also returns, when scoring by generation, the fraction of
        Self's multiple-choice replies that named no option."""
        state.model.eval()
        started = set(state.stream.tasks_started(round_index))
        own = [r for r in self.entry.datasets if r.key in started]
        self_scores, unparsable = self._evaluate_refs(state, own, self.config.eval_max_samples)
        scores = {"self": self_scores}
        if eval_others:
            owner = self.res.scenario.task_owner()
            others = [t for t in self.res.scenario.tasks() if owner[t.key] != int(self.client_id)]
            scores["others"] = self._evaluate_refs(state, others, self.config.eval_others_max_samples)[0]
        if eval_unseen:
            scores["unseen"] = self._evaluate_refs(state, self.res.unseen_tasks(), self.config.eval_others_max_samples)[0]
        state.model.train()
        return scores, unparsable

    def save(self, state: RoundState, server_round: int) -> None:
        """Everything the next round needs, as this round's snapshot."""
        state.store.save(server_round, capture_state(
            server_round, state.model, state.optimizer, state.names, state.accumulator, state.stream, state.memory
        ))

    def _evaluate_refs(
        self, state: RoundState, refs: list[TaskRef], max_samples: int
    ) -> tuple[dict[str, float], float | None]:
        out: dict[str, float] = {}
        choice_samples = unparsable = 0
        for ref in refs:
            samples = self.res.test_samples(ref, max_samples)
            if not samples:
                continue
            result = score_samples(
                state.model, state.adapted.loaded.processor, samples, scoring=self.config.scoring,
                max_length=self.config.max_length, max_new_tokens=self.config.max_new_tokens,
            )
            out[ref.key] = result.score
            choice_samples += result.choice_samples
            unparsable += result.unparsable
        rate = unparsable / choice_samples if self.config.scoring == "generation" and choice_samples else None
        return out, rate


def _mean_str(scores: dict[str, float]) -> str:
    return f"{100 * float(np.mean(list(scores.values()))):.1f}%" if scores else "—"
