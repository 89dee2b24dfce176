"""Per-client global adapters on the server (RELA, DESIGN §4).

For the M valid clients of a round, with weight matrix W (M × M)::

    shared (PQ P/Q, every architecture):   G_i[key] = Σ_j W_ij · L_j[key]
    same-arch (plain LoRA A/B):            G_i[key] = Σ_{j ∈ arch(i)} W_ij · L_j[key] / Σ_{j ∈ arch(i)} W_ij

Every parameter is stacked across clients into an M × numel matrix and all M customised states
come out of one matrix product ``W @ stack`` per parameter (chunked over parameters, so peak
extra memory is one parameter's stack, not the whole payload).

Modes:

- ``fedmosaic``: W = ``relevance_weights(task_similarity(task vectors), tau)`` (diagonal 0).
- ``fedmosaic-uniform``: W_ij = 1/(M−1) for j ≠ i (RELA off, same structure otherwise).
- ``fedavg``: the classic baseline: P/Q *and* LoRA A/B averaged with equal weights within each
  same-architecture group, the client itself included (a client alone in its group gets its own
  local state back).
- ``local``: no sharing; every client keeps its previous global state; W is all zeros.

Exclusions: an update with NaN/Inf, a wrong shape (including a wrong rank r), an unknown or a
missing key, or (``fedmosaic`` only) a missing / wrongly shaped / non-finite task vector is left
out of the round with one ``logging`` warning naming the client and the reason; the others are
aggregated as if it had not replied. With fewer than 2 valid clients everyone keeps its previous
global state. Clients that are absent or excluded keep their previous global state; a client
with no same-architecture peer keeps its previous plain-LoRA global state.

``globals`` holds an entry for every client in ``previous`` and every valid client. A part that
has nothing new and no previous value is an empty dict, meaning "keep what you have". Outputs
are float32; a client's tensors are rows of a per-parameter result matrix (contiguous, one
storage per parameter).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmosaic_core.rela.similarity import relevance_weights, task_similarity

logger = logging.getLogger(__name__)

MODES = ("fedmosaic", "fedmosaic-uniform", "fedavg", "local")
SHARED_KEY = re.compile(r"^pq\.(\d+)\.([A-Za-z0-9_]+)\.(P|Q)$")
SAME_ARCH_KEY = re.compile(r"^lora\.(\d+)\.([A-Za-z0-9_]+)\.(A|B)$")

Shapes = dict[str, tuple[int, ...]]


@dataclass
class ClientUpdate:
    """One client's reply: its local shared (P/Q) and same-architecture (LoRA A/B) states."""

    client_id: str
    arch: str
    shared: dict[str, torch.Tensor]
    same_arch: dict[str, torch.Tensor]
    task_vector: np.ndarray | None = None


@dataclass
class GlobalState:
    """A client's global branch: shared P/Q and same-architecture LoRA A/B."""

    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    same_arch: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AggregationResult:
    globals: dict[str, GlobalState]
    weights: np.ndarray  # M × M over client_ids (the shared-part weights)
    client_ids: list[str]  # the valid clients of this round, in update order
    excluded: dict[str, str]  # client id -> reason


# -- validation -------------------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _majority_shapes(states: Sequence[Mapping[str, Any]]) -> Shapes:
    """The most common key set, and for each key its most common shape."""
    if not states:
        return {}
    keys = Counter(frozenset(state) for state in states).most_common(1)[0][0]
    shapes: Shapes = {}
    for key in sorted(keys):
        counts = Counter(_shape(state[key]) for state in states if key in state)
        shape = counts.most_common(1)[0][0]
        if shape is not None:
            shapes[key] = shape
    return shapes


def _rank_of(key: str, shape: tuple[int, ...]) -> int | None:
    """r read off a PQ / LoRA shape (P: r×r, Q: r, A: r×d_in, B: d_out×r)."""
    if not shape:
        return None
    suffix = key.rsplit(".", 1)[-1]
    return shape[-1] if suffix == "B" else shape[0]


def _check_state(
    part: str, state: Mapping[str, Any], expected: Shapes, pattern: re.Pattern[str]
) -> str | None:
    if not isinstance(state, Mapping):
        return f"{part} state is a {type(state).__name__}, not a dict"
    for key in sorted(state):
        if not isinstance(key, str) or not pattern.match(key):
            return f"malformed {part} key {key!r}"
        if key not in expected:
            return f"unknown {part} key {key!r}"
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"missing {part} key {missing[0]!r}{more}"
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return f"{part} {key!r} is not a floating-point torch.Tensor"
        shape, want = tuple(value.shape), expected[key]
        if shape != want:
            got_r, want_r = _rank_of(key, shape), _rank_of(key, want)
            if len(shape) == len(want) and got_r != want_r:
                return f"wrong rank r={got_r} (expected r={want_r}): {part} {key!r} has shape {shape}, expected {want}"
            return f"wrong shape: {part} {key!r} has shape {shape}, expected {want}"
        if not bool(torch.isfinite(value).all()):
            return f"non-finite values (NaN/Inf) in {part} {key!r}"
    return None


def _as_task_vector(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _check_task_vector(vector: np.ndarray | None, expected: tuple[int, ...] | None) -> str | None:
    if vector is None:
        return "no task vector"
    if not np.issubdtype(vector.dtype, np.floating):
        return f"task vector has dtype {vector.dtype}, expected float"
    if vector.ndim != 2 or vector.shape != expected:
        return f"task vector has shape {vector.shape}, expected {expected}"
    if not np.isfinite(vector).all():
        return "task vector has non-finite values (NaN/Inf)"
    return None


def _check_expected(name: str, shapes: Mapping[str, tuple[int, ...]], pattern: re.Pattern[str]) -> Shapes:
    out: Shapes = {}
    for key, shape in shapes.items():
        if not pattern.match(key):
            raise ValueError(f"aggregate_global_states: {name} has a malformed key {key!r}")
        out[key] = tuple(int(s) for s in shape)
    return out


# -- mixing -----------------------------------------------------------------------------------
def _mix(
    weights: np.ndarray,
    states: Sequence[Mapping[str, torch.Tensor]],
    keys: Sequence[str],
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """``out[i][key] = Σ_j weights[i, j] · states[j][key]`` as one matrix product per key."""
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in range(w.shape[0])]
    for key in keys:
        shape = states[0][key].shape
        stack = torch.stack([state[key].detach().reshape(-1).to(device, torch.float32) for state in states])
        mixed = w @ stack  # rows × numel
        for i, row in enumerate(mixed):
            outputs[i][key] = row.view(shape)
    return outputs


def _weight_matrix(mode: str, valid: Sequence[ClientUpdate], tau: float) -> np.ndarray:
    m = len(valid)
    if mode == "fedmosaic":
        vectors = [_as_task_vector(u.task_vector) for u in valid]
        return relevance_weights(task_similarity(vectors), tau)
    if mode == "fedmosaic-uniform":
        return (1.0 - np.eye(m)) / (m - 1)
    if mode == "fedavg":
        arch = np.array([u.arch for u in valid], dtype=object)
        same = (arch[:, None] == arch[None, :]).astype(np.float64)
        return same / same.sum(axis=1, keepdims=True)
    raise AssertionError(mode)


def aggregate_global_states(
    updates: list[ClientUpdate],
    previous: dict[str, GlobalState],
    *,
    mode: str = "fedmosaic",
    tau: float = 0.5,
    expected_shared: dict[str, tuple[int, ...]] | None = None,
    expected_same_arch: dict[str, dict[str, tuple[int, ...]]] | None = None,
    device: str | torch.device | None = None,
) -> AggregationResult:
    """Build every client's global state for the next round (see the module docstring).

    ``expected_shared``: key → shape of the shared state, for everyone; ``expected_same_arch``:
    arch → (key → shape). When None they are inferred from the majority of this round's updates
    (per architecture for the same-arch part). ``device``: where the matrix products run and
    the new states live (default CPU).
    """
    if mode not in MODES:
        raise ValueError(f"aggregate_global_states: unknown mode {mode!r}; expected one of {MODES}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"aggregate_global_states: tau must be a positive number, got {tau!r}")
    ids = [u.client_id for u in updates]
    duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
    if duplicates:
        raise ValueError(f"aggregate_global_states: duplicate client ids {duplicates}")

    shared_shapes = (
        _check_expected("expected_shared", expected_shared, SHARED_KEY)
        if expected_shared is not None
        else _majority_shapes([u.shared for u in updates if isinstance(u.shared, Mapping)])
    )
    arch_shapes: dict[str, Shapes]
    if expected_same_arch is not None:
        arch_shapes = {
            arch: _check_expected(f"expected_same_arch[{arch!r}]", shapes, SAME_ARCH_KEY)
            for arch, shapes in expected_same_arch.items()
        }
    else:
        archs = sorted({u.arch for u in updates})
        arch_shapes = {
            arch: _majority_shapes([u.same_arch for u in updates if u.arch == arch and isinstance(u.same_arch, Mapping)])
            for arch in archs
        }
    need_task_vector = mode == "fedmosaic"
    tv_shape: tuple[int, ...] | None = None
    if need_task_vector:
        shapes = [v.shape for v in (_as_task_vector(u.task_vector) for u in updates) if v is not None]
        tv_shape = Counter(shapes).most_common(1)[0][0] if shapes else None

    valid: list[ClientUpdate] = []
    excluded: dict[str, str] = {}
    for update in updates:
        reason: str | None
        if update.arch not in arch_shapes:
            reason = f"unknown architecture {update.arch!r}"
        else:
            reason = _check_state("shared", update.shared, shared_shapes, SHARED_KEY) or _check_state(
                "same-arch", update.same_arch, arch_shapes[update.arch], SAME_ARCH_KEY
            )
        if reason is None and need_task_vector:
            reason = _check_task_vector(_as_task_vector(update.task_vector), tv_shape)
        if reason is None:
            valid.append(update)
        else:
            excluded[update.client_id] = reason
            logger.warning("RELA: client %s excluded from this round: %s", update.client_id, reason)

    client_ids = [u.client_id for u in valid]
    result_globals: dict[str, GlobalState] = {
        cid: GlobalState(dict(state.shared), dict(state.same_arch)) for cid, state in previous.items()
    }
    m = len(valid)
    if mode == "local" or m < 2:
        if mode != "local":
            logger.warning("RELA: only %d valid client(s) this round; everyone keeps the previous global state", m)
        for cid in client_ids:
            result_globals.setdefault(cid, GlobalState())
        return AggregationResult(result_globals, np.zeros((m, m)), client_ids, excluded)

    weights = _weight_matrix(mode, valid, tau)
    target = torch.device("cpu") if device is None else torch.device(device)
    shared_out = _mix(weights, [u.shared for u in valid], sorted(shared_shapes), target)
    for update, shared in zip(valid, shared_out, strict=True):
        before = previous.get(update.client_id)
        result_globals[update.client_id] = GlobalState(shared, dict(before.same_arch) if before else {})

    for arch in sorted({u.arch for u in valid}):
        members = [i for i, u in enumerate(valid) if u.arch == arch]
        block = weights[np.ix_(members, members)]
        totals = block.sum(axis=1)
        receivers = [k for k in range(len(members)) if totals[k] > 0]
        if not receivers:
            continue  # a lone client of its architecture keeps its previous plain-LoRA global
        normalised = block[receivers] / totals[receivers, None]
        mixed = _mix(normalised, [valid[i].same_arch for i in members], sorted(arch_shapes[arch]), target)
        for k, state in zip(receivers, mixed, strict=True):
            result_globals[valid[members[k]].client_id].same_arch = state
    return AggregationResult(result_globals, weights, client_ids, excluded)
