"""Data streams and the replay memory of docs/method.md, "DRAKE", deterministic under a seed and resumable.

*dynamic*: tasks one after another, ``rounds_per_task`` rounds each; a task's samples (shuffled
with the seed) are cut into that many consecutive, near-equal chunks.
*static*: every task's samples pooled, shuffled, cut into ``n_tasks * rounds_per_task`` chunks.

Replay memory: a batch of k samples is drawn without replacement with
``p_j ∝ exp(−u_j / T)`` (softmax of −use count over temperature T = 0.125); then every count is
decayed ``u ← 0.99·u`` and the drawn samples get ``u_j ← u_j + 1``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from drake_data.errors import DrakeDataError

StreamMode = Literal["dynamic", "static"]
_STATE_VERSION = 1


def sample_key(dataset: str, subset_id: int, record_id: str) -> str:
    """A sample id unique across tasks: ``"<dataset>-<subset_id>/<record id>"``."""
    return f"{dataset}-{subset_id}/{record_id}"


def _split_even(items: Sequence[str], parts: int) -> list[list[str]]:
    """Consecutive chunks whose sizes differ by at most one (the larger ones first)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = q + (1 if k < r else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


class Stream:
    """Per-round chunks of sample ids for one client, with a resumable read position."""

    def __init__(self, chunks: list[list[str]], round_tasks: list[list[str]], task_start_round: dict[str, int],
                 mode: StreamMode, rounds_per_task: int, seed: int, fingerprint: str) -> None:
        self.chunks = chunks
        self.round_tasks = round_tasks
        self.task_start_round = task_start_round
        self.mode = mode
        self.rounds_per_task = rounds_per_task
        self.seed = seed
        self.fingerprint = fingerprint
        self.position = 0

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, round_index: int) -> list[str]:
        return self.chunks[round_index]

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self.chunks)

    @property
    def num_rounds(self) -> int:
        return len(self.chunks)

    def tasks_started(self, round_index: int) -> list[str]:
        """Tasks whose data has begun to arrive by ``round_index`` (0-based)."""
        return [t for t, r in self.task_start_round.items() if r <= round_index]

    def next_chunk(self) -> list[str]:
        """The chunk at the current position; advances the position by one round."""
        if self.position >= len(self.chunks):
            raise DrakeDataError(f"stream exhausted after {len(self.chunks)} rounds")
        chunk = self.chunks[self.position]
        self.position += 1
        return chunk

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position (+ what identifies the stream, checked on load)."""
        return {"version": _STATE_VERSION, "mode": self.mode, "seed": self.seed,
                "rounds_per_task": self.rounds_per_task, "fingerprint": self.fingerprint,
                "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("mode", "seed", "rounds_per_task", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise DrakeDataError(
                    f"stream state does not match this stream: {key} is {state.get(key)!r} in the state, "
                    f"{getattr(self, key)!r} here (same tasks, mode and seed are needed to resume)"
                )
        position = int(state["position"])
        if not 0 <= position <= len(self.chunks):
            raise DrakeDataError(f"stream state position {position} outside 0..{len(self.chunks)}")
        self.position = position


def build_stream(
    client_tasks: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
    mode: StreamMode = "dynamic",
    rounds_per_task: int = 5,
    seed: int = 0,
) -> Stream:
    """Cut a client's tasks (ordered task key → sample ids) into per-round chunks."""
    tasks = list(client_tasks.items()) if isinstance(client_tasks, Mapping) else list(client_tasks)
    if mode not in ("dynamic", "static"):
        raise DrakeDataError(f"stream mode must be 'dynamic' or 'static', got {mode!r}")
    if rounds_per_task < 1:
        raise DrakeDataError(f"rounds_per_task must be ≥ 1, got {rounds_per_task}")
    if not tasks:
        raise DrakeDataError("a stream needs at least one task")
    seen: dict[str, str] = {}
    for key, ids in tasks:
        if len(ids) < rounds_per_task:
            raise DrakeDataError(f"task {key} has {len(ids)} samples, fewer than rounds_per_task={rounds_per_task}")
        for sid in ids:
            if sid in seen:
                raise DrakeDataError(f"sample id {sid!r} appears in task {seen[sid]} and task {key}")
            seen[sid] = key
    fingerprint = hashlib.sha256(json.dumps([[k, list(v)] for k, v in tasks]).encode()).hexdigest()[:16]
    rng = np.random.default_rng(seed)
    chunks: list[list[str]] = []
    round_tasks: list[list[str]] = []
    if mode == "dynamic":
        start = {}
        for t, (key, ids) in enumerate(tasks):
            order = [ids[i] for i in rng.permutation(len(ids))]
            start[key] = t * rounds_per_task
            for chunk in _split_even(order, rounds_per_task):
                chunks.append(chunk)
                round_tasks.append([key])
    else:
        pool = [sid for _, ids in tasks for sid in ids]
        order = [pool[i] for i in rng.permutation(len(pool))]
        chunks = _split_even(order, len(tasks) * rounds_per_task)
        round_tasks = [sorted({seen[s] for s in c}) for c in chunks]
        start = {key: 0 for key, _ in tasks}
    return Stream(chunks, round_tasks, start, mode, rounds_per_task, seed, fingerprint)


class ReplayMemory:
    """Samples seen so far, drawn with priority to rarely used ones (see module docstring)."""

    def __init__(self, temperature: float = 0.125, decay: float = 0.99, capacity: int | None = None,
                 seed: int = 0) -> None:
        if temperature <= 0 or not 0 < decay <= 1:
            raise DrakeDataError(f"need temperature > 0 and 0 < decay ≤ 1, got {temperature}, {decay}")
        if capacity is not None and capacity < 1:
            raise DrakeDataError(f"capacity must be ≥ 1 or None, got {capacity}")
        self.temperature = temperature
        self.decay = decay
        self.capacity = capacity
        self.ids: list[str] = []
        self.counts = np.zeros(0, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, sample_ids: Sequence[str]) -> None:
        """Append new samples (use count 0); beyond ``capacity`` the oldest are evicted (FIFO)."""
        present = set(self.ids)
        for sid in sample_ids:
            if sid in present:
                raise DrakeDataError(f"replay memory already holds sample {sid!r}")
            present.add(sid)
        self.ids.extend(sample_ids)
        self.counts = np.concatenate([self.counts, np.zeros(len(sample_ids))])
        if self.capacity is not None and len(self.ids) > self.capacity:
            drop = len(self.ids) - self.capacity
            self.ids = self.ids[drop:]
            self.counts = self.counts[drop:]

    def probabilities(self) -> np.ndarray:
        """p_j = exp(−u_j/T) / Σ_k exp(−u_k/T)."""
        if not self.ids:
            return np.zeros(0)
        logits = -self.counts / self.temperature
        logits -= logits.max()
        w = np.exp(logits)
        return w / w.sum()

    def sample(self, batch_size: int) -> list[str]:
        """Draw ``min(batch_size, len)`` distinct samples; updates the use counts."""
        if not self.ids:
            raise DrakeDataError("cannot sample from an empty replay memory")
        k = min(batch_size, len(self.ids))
        idx = self._rng.choice(len(self.ids), size=k, replace=False, p=self.probabilities())
        self.counts *= self.decay
        self.counts[idx] += 1.0
        return [self.ids[i] for i in idx]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (JSON-serialisable)."""
        return {"version": _STATE_VERSION, "temperature": self.temperature, "decay": self.decay,
                "capacity": self.capacity, "ids": list(self.ids),
                "counts": [float(c) for c in self.counts], "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ids, counts = list(state["ids"]), [float(c) for c in state["counts"]]
        if len(ids) != len(counts) or len(set(ids)) != len(ids):
            raise DrakeDataError("replay memory state: ids and counts differ in length or ids repeat")
        self.temperature = float(state["temperature"])
        self.decay = float(state["decay"])
        self.capacity = state.get("capacity")
        self.ids = ids
        self.counts = np.asarray(counts, dtype=np.float64)
        bitgen = np.random.PCG64()
        bitgen.state = state["rng"]
        self._rng = np.random.Generator(bitgen)
