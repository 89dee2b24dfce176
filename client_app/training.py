"""One FedMosaic client round, step by step (docs/method.md, "One round").

Round ``t``: **restore** the state saved after round ``t-1``; **load the global** state into
the frozen global branch; the round's **stream** chunk enters the replay memory; **train** the
local branch and the gate for ``local-steps`` steps on replayed batches (AdamW; P/Q and gates at
``lr-pq``, plain LoRA A/B at ``lr-lora``), probing every ``probe-every`` steps; finish the **task
vector** (smooth, compress); **evaluate** Self (and Others/unseen when asked); **save** the state
of round ``t``. Every setting comes from the config of the run being served.

That is FedMosaic's round. The baselines differ in what trains, on which output, what is uploaded
and where the aggregate goes (:mod:`fedmosaic_core.methods`); the steps above are the same.
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
from client_app.state import (
    ClientStateStore,
    SavedReply,
    capture_state,
    received_digest,
    restore_adapter,
    restore_state,
    saved_reply,
)
from drake_data.layout import ScenarioEntry, TaskRef
from drake_data.streams import ReplayMemory, Stream, build_stream
from fedmosaic_core.methods import METHODS, LocalMethod, Output, Phase
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
    """AdamW over the trainable adapter: P/Q and the gates at ``lr-pq``, plain LoRA at ``lr-lora``
    (the global branch's too, where the method trains it)."""
    lr = {"pq": config.lr_pq, "gate": config.lr_pq, "lora": config.lr_lora,
          "pq-global": config.lr_pq, "lora-global": config.lr_lora}
    return torch.optim.AdamW(
        [{"params": params, "lr": lr[name]} for name, params in model.parameter_groups().items() if params],
        weight_decay=config.weight_decay,
    )


#: which optimiser groups (:meth:`PQLoRAModel.parameter_groups`) a phase's ``trains`` names
PHASE_GROUPS = {"local": ("pq", "lora"), "gate": ("gate",), "global": ("pq-global", "lora-global")}


def use_output(model: PQLoRAModel, output: Output, fixed_beta: float) -> None:
    """Set how the two branches form the output: a fixed β, FedSim's logit sum, or the learned gate
    (``None``; then the run's ``fixed-beta`` ablation, if set, still applies)."""
    model.set_logit_sum(None)
    if output == "logit-sum":
        model.set_logit_sum((1.0, 0.0))
        model.set_fixed_beta(None)
    elif output is None:
        model.set_fixed_beta(fixed_beta if fixed_beta >= 0 else None)
    else:
        model.set_fixed_beta(float(output))


@dataclass
class RoundResult:
    local_shared: dict[str, torch.Tensor]
    local_same_arch: dict[str, torch.Tensor]
    task_vector: np.ndarray | None
    metrics: dict[str, float]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    arch: str = ""
    model_id: str = ""


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
    global_at_start: dict[str, torch.Tensor] = field(default_factory=dict)  # G₀ for Ditto's proximal term

    @property
    def model(self) -> PQLoRAModel:
        return self.adapted.model

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def frozen_in(self, phase: Phase) -> list[torch.Tensor]:
        """The trainable parameters that ``phase`` leaves alone (their gradients are dropped, so
        AdamW does not move them with old momentum either)."""
        groups = self.model.parameter_groups()
        kept = {id(p) for name in phase.trains for group in PHASE_GROUPS[name] for p in groups[group]}
        return [p for p in self.trainable if id(p) not in kept]


class FedMosaicClient:
    """A client bound to the run's config, its scenario entry, its model and its state directory."""

    def __init__(self, config: FederationConfig, resources: Resources, client_id: str, state_root: Path) -> None:
        self.config = config
        self.res = resources
        self.client_id = client_id
        try:
            number = int(client_id)
        except ValueError:
            raise ValueError(f"client id {client_id!r} is not an integer (a scenario's client_id)") from None
        self.entry: ScenarioEntry = resources.scenario.client(number)
        self.state_root = state_root

    @property
    def method(self) -> LocalMethod:
        return METHODS[self.config.strategy]

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
        last_round: int = 0,
        run_id: int = 0,
    ) -> RoundResult:
        """One round; ``last_round`` is the server's record of the last round this client completed
        (0: none or unknown), which its saved state must reach; ``run_id``: the Flower run."""
        started = time.monotonic()
        received = received_digest(global_shared, global_same_arch)
        state = self.restore(server_round, run_name, last_round)
        self.load_global(state, global_shared, global_same_arch)
        round_index = self.take_new_data(state)
        losses = self.train(state, server_round)
        betas = state.model.trained_beta_by_block(reset=True)
        train_time = time.monotonic() - started
        task_vector = self.task_vector(state)
        upload = self.method.upload
        uploaded = state.model.shared_state(upload), state.model.same_arch_state(upload)
        scores, unparsable = self.evaluate(state, round_index, eval_others=eval_others, eval_unseen=eval_unseen)
        metrics = {
            "train-loss": float(np.mean(losses)) if losses else math.nan,
            "train-steps": float(len(losses)),  # optimiser steps
            "train-time-s": train_time,
            "round-time-s": time.monotonic() - started,
            "replay-size": float(len(state.memory)),
            "grad-norm-max": max(state.grad_norms, default=math.nan),
            **{f"beta-block-{k}": beta for k, beta in betas.items()},  # mean gate value while training
        }
        if unparsable is not None:
            metrics["unparsable-rate"] = unparsable
        arch, model_id = state.adapted.arch, self.entry.model_id
        self.save(state, server_round, SavedReply(run_id, upload, task_vector, metrics, scores, arch, model_id, received))
        log.info("client %s round %d: loss %.3f, self %s, %.1fs", self.client_id, server_round,
                 metrics["train-loss"], _mean_str(scores["self"]), metrics["round-time-s"])
        return RoundResult(uploaded[0], uploaded[1], task_vector, metrics, scores, arch, model_id)

    def saved_result(
        self, server_round: int, run_name: str,
        global_shared: dict[str, torch.Tensor] | None, global_same_arch: dict[str, torch.Tensor] | None,
        run_id: int = 0,
    ) -> RoundResult | None:
        """The result this client already saved for ``server_round`` of Flower run ``run_id`` from
        the same global state, or None. The server asks again when a reply was lost on the way (Flower's SuperNode does
        not retry a failed push): the answer comes from disk, the round is not trained twice."""
        snapshot = ClientStateStore(self.state_root, run_name, self.client_id).load_round(server_round)
        found = saved_reply(snapshot) if snapshot is not None else None
        if (found is None or found[0].run_id != run_id
                or found[0].received != received_digest(global_shared, global_same_arch)):
            return None
        reply, shared, same_arch = found
        log.info("client %s round %d: asked again; answering from the state saved after training it",
                 self.client_id, server_round)
        return RoundResult(shared, same_arch, reply.task_vector, reply.metrics, reply.scores, reply.arch, reply.model_id)

    def restore(self, server_round: int, run_name: str, last_round: int = 0) -> RoundState:
        """The state saved after the last round this client completed (none yet: the freshly
        injected adapter)."""
        cfg = self.config
        adapted = self._adapted()
        adapted.model.set_global_trainable(self.method.trains_global)  # before the optimiser is built
        store = ClientStateStore(self.state_root, run_name, self.client_id)
        snapshot = store.load_latest(server_round - 1, at_least=last_round)
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
        use_output(adapted.model, None, cfg.fixed_beta)
        if snapshot is None:
            restore_adapter(adapted.model, adapted.initial)
        else:
            restore_state(snapshot, adapted.model, optimizer, names, accumulator, stream, memory)
        return RoundState(adapted, optimizer, names, accumulator, probe_model, probe, stream, memory, store)

    def load_global(
        self, state: RoundState, shared: dict[str, torch.Tensor] | None, same_arch: dict[str, torch.Tensor] | None
    ) -> None:
        """The server's G_i into the global branch (validated before anything is written). Under
        ``fedavg`` it is the architecture group's mean and replaces the local branch instead: one
        adapter, as in FedAvg; the global branch stays 0, so the gate rests as in ``local``. An
        empty or absent part is nothing new: the model keeps what it has there."""
        if shared or same_arch:
            if self.method.receive == "local":
                state.model.load_local_state(shared=shared or None, same_arch=same_arch or None)
            else:
                state.model.load_global_state(shared=shared or None, same_arch=same_arch or None)
        state.global_at_start = {k: p.detach().clone() for k, p in state.model.branch_parameters("global").items()}

    def take_new_data(self, state: RoundState) -> int:
        """This round's stream chunk enters the replay memory; returns the stream round index."""
        if state.stream.position < state.stream.num_rounds:
            state.memory.add(state.stream.next_chunk())
        return state.stream.position - 1

    def train(self, state: RoundState, server_round: int) -> list[float]:
        """The method's local iterations (``local-steps`` × its compute share) on replayed batches,
        each one or more AdamW steps (:meth:`LocalMethod.phases`); the probe every ``probe-every``
        iterations (FedMosaic). Returns each step's task loss."""
        cfg = self.config
        torch.manual_seed(derived_seed(cfg.seed, self.client_id, server_round))
        processor = state.adapted.loaded.processor
        state.model.train()
        state.model.trained_beta_by_block(reset=True)  # count this round's β only
        iterations = cfg.local_iterations
        losses: list[float] = []
        frozen: dict[Phase, list[torch.Tensor]] = {}
        for step in tqdm(range(iterations), desc=f"client {self.client_id} round {server_round}",
                         leave=False, mininterval=5.0, disable=None):
            samples = [self.res.samples[i] for i in state.memory.sample(cfg.batch_size)]
            batch = collate(processor, samples, cfg.max_length)
            for phase in self.method.phases(step, iterations):
                if phase not in frozen:  # once per phase: FedDPA's global is non-zero after its first half
                    resting = state.model.gates_without_global() if cfg.gate_rest_without_global else []
                    frozen[phase] = state.frozen_in(phase) + resting
                losses.append(self.train_step(state, phase, batch, frozen[phase], step))
            if step % cfg.probe_every == 0 and self.method.task_vectors:
                state.accumulator.add(state.probe.gradient(collate(state.probe_model.processor, samples, cfg.max_length)))
        use_output(state.model, None, cfg.fixed_beta)
        return losses

    def train_step(
        self, state: RoundState, phase: Phase, batch: dict[str, torch.Tensor], frozen: list[torch.Tensor], step: int
    ) -> float:
        """One AdamW step of ``phase``: task loss (+ μ‖L − G₀‖²), clipped to norm 1."""
        use_output(state.model, phase.output, self.config.fixed_beta)
        loss = answer_loss_mean(state.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"client {self.client_id}: non-finite loss at step {step}")
        objective = loss
        if phase.proximal:
            local = state.model.branch_parameters("local")
            objective = loss + phase.proximal * sum(
                (local[k] - anchor).pow(2).sum() for k, anchor in state.global_at_start.items())
        objective.backward()
        for parameter in frozen:
            parameter.grad = None
        state.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(state.trainable, MAX_GRAD_NORM)))
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def task_vector(self, state: RoundState) -> np.ndarray | None:
        """The round's smoothed, compressed task vector (only RELA needs one)."""
        if not self.method.task_vectors:
            return None
        return upload_task_vector(self.config, state.accumulator.end_round())

    def evaluate(
        self, state: RoundState, round_index: int, *, eval_others: bool, eval_unseen: bool
    ) -> tuple[dict[str, dict[str, float]], float | None]:
        """Self on the tasks started so far; Others (every other client's tasks) and unseen tasks
        when the round asks for them. Also returns, when scoring by generation, the fraction of
        Self's multiple-choice replies that named no option."""
        state.model.eval()
        use_output(state.model, self.method.evaluate, self.config.fixed_beta)
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
        use_output(state.model, None, self.config.fixed_beta)
        state.model.train()
        return scores, unparsable

    def save(self, state: RoundState, server_round: int, reply: SavedReply | None = None) -> None:
        """Everything the next round needs, and what the client answers, as this round's snapshot."""
        state.store.save(server_round, capture_state(
            server_round, state.model, state.optimizer, state.names, state.accumulator, state.stream, state.memory,
            reply,
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
