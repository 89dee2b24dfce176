"""Per-client global adapters on the server (RELA; docs/method.md, "RELA").

For the M valid clients of a round, with weight matrix W (M × M)::

    shared (PQ P/Q, every architecture):   G_i[key] = Σ_j W_ij · L_j[key]
    same-arch (plain LoRA A/B):            G_i[key] = Σ_{j ∈ arch(i)} W_ij · L_j[key] / Σ_{j ∈ arch(i)} W_ij

Each part is flattened per client and stacked into one M × D matrix (D: all its floats), checked
for NaN/Inf in one pass, and all M customised states come out of one matrix product
``W @ stack``; each client's tensors are views into its row of the result.

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
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmosaic_core.pqlora.state import Spec, first_problem, is_key
from fedmosaic_core.rela.similarity import relevance_weights, task_similarity

logger = logging.getLogger(__name__)

MODES = ("fedmosaic", "fedmosaic-uniform", "fedavg", "local")


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


def _majority_spec(states: Sequence[Mapping[str, Any]]) -> Spec:
    """The most common key set, and for each key its most common shape."""
    if not states:
        return {}
    keys = Counter(frozenset(state) for state in states).most_common(1)[0][0]
    spec: Spec = {}
    for key in sorted(keys):
        shape = Counter(_shape(state[key]) for state in states if key in state).most_common(1)[0][0]
        if shape is not None:
            spec[key] = shape
    return spec


def _checked_spec(name: str, part: str, shapes: Mapping[str, Sequence[int]]) -> Spec:
    spec: Spec = {}
    for key, shape in shapes.items():
        if not is_key(part, key):
            raise ValueError(f"aggregate_global_states: {name} has a malformed key {key!r}")
        spec[key] = tuple(int(s) for s in shape)
    return dict(sorted(spec.items()))


def _as_task_vector(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def _task_vector_problem(vector: np.ndarray | None, expected: tuple[int, ...] | None) -> str | None:
    if vector is None:
        return "no task vector"
    if not np.issubdtype(vector.dtype, np.floating):
        return f"task vector has dtype {vector.dtype}, expected float"
    if vector.ndim != 2 or vector.shape != expected:
        return f"task vector has shape {vector.shape}, expected {expected}"
    if not np.isfinite(vector).all():
        return "task vector has non-finite values (NaN/Inf)"
    return None


# -- flat stacks ------------------------------------------------------------------------------
def _stack(states: Sequence[Mapping[str, torch.Tensor]], spec: Spec) -> torch.Tensor:
    """M × D float32 matrix: row j is state j's tensors, in ``spec`` order, flattened."""
    width = sum(math.prod(shape) for shape in spec.values())
    out = torch.empty(len(states), width, dtype=torch.float32)
    if not spec:
        return out  # e.g. a model whose every adapted layer is a PQ layer: no plain LoRA
    for row, state in zip(out, states, strict=True):
        torch.cat([state[key].detach().reshape(-1).float().cpu() for key in spec], out=row)
    return out


def _unstack(matrix: torch.Tensor, spec: Spec) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`_stack`: per row, key → a view of that row in the key's shape."""
    sizes = [math.prod(shape) for shape in spec.values()]
    outputs = []
    for row in matrix:
        pieces = torch.split(row, sizes)
        outputs.append({key: piece.view(shape) for (key, shape), piece in zip(spec.items(), pieces, strict=True)})
    return outputs


def _finite_rows(stack: torch.Tensor) -> torch.Tensor:
    """Which rows hold only finite values, in one memory pass: NaN and ±Inf propagate into a
    row's float64 sum (which cannot overflow for float32 inputs)."""
    return torch.isfinite(stack.sum(dim=1, dtype=torch.float64))


def _non_finite_key(state: Mapping[str, torch.Tensor], spec: Spec) -> str:
    return next(key for key in spec if not bool(torch.isfinite(state[key]).all()))


def _weight_matrix(mode: str, valid: Sequence[ClientUpdate], tau: float) -> np.ndarray:
    m = len(valid)
    if mode == "fedmosaic":
        return relevance_weights(task_similarity([_as_task_vector(u.task_vector) for u in valid]), tau)
    if mode == "fedmosaic-uniform":
        return (1.0 - np.eye(m)) / (m - 1)
    if mode == "fedavg":
        arch = np.array([u.arch for u in valid], dtype=object)
        same = (arch[:, None] == arch[None, :]).astype(np.float64)
        return same / same.sum(axis=1, keepdims=True)
    raise AssertionError(mode)


def _mix(weights: np.ndarray, stack: torch.Tensor, device: torch.device) -> torch.Tensor:
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(device)
    return (w @ stack.to(device)).to("cpu") if device.type != "cpu" else w @ stack


def aggregate_global_states(
    updates: list[ClientUpdate],
    previous: dict[str, GlobalState],
    *,
    mode: str = "fedmosaic",
    tau: float = 0.5,
    expected_shared: Mapping[str, Sequence[int]] | None = None,
    expected_same_arch: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    device: str | torch.device | None = None,
) -> AggregationResult:
    """Build every client's global state for the next round (see the module docstring).

    ``expected_shared``: key → shape of the shared state, for everyone; ``expected_same_arch``:
    arch → (key → shape). When None they are inferred from the majority of this round's updates
    (per architecture for the same-arch part). ``device``: where the matrix products run (the
    new states live on the CPU).
    """
    if mode not in MODES:
        raise ValueError(f"aggregate_global_states: unknown mode {mode!r}; expected one of {MODES}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"aggregate_global_states: tau must be a positive number, got {tau!r}")
    ids = [u.client_id for u in updates]
    duplicates = sorted({cid for cid, count in Counter(ids).items() if count > 1})
    if duplicates:
        raise ValueError(f"aggregate_global_states: duplicate client ids {duplicates}")

    shared_spec = (
        _checked_spec("expected_shared", "shared", expected_shared)
        if expected_shared is not None
        else _majority_spec([u.shared for u in updates if isinstance(u.shared, Mapping)])
    )
    arch_specs: dict[str, Spec]
    if expected_same_arch is not None:
        arch_specs = {
            arch: _checked_spec(f"expected_same_arch[{arch!r}]", "same-arch", shapes)
            for arch, shapes in expected_same_arch.items()
        }
    else:
        arch_specs = {
            arch: _majority_spec([u.same_arch for u in updates if u.arch == arch and isinstance(u.same_arch, Mapping)])
            for arch in sorted({u.arch for u in updates})
        }
    need_task_vector = mode == "fedmosaic"
    tv_shape: tuple[int, ...] | None = None
    if need_task_vector:
        shapes = [v.shape for v in (_as_task_vector(u.task_vector) for u in updates) if v is not None]
        tv_shape = Counter(shapes).most_common(1)[0][0] if shapes else None

    # structure first (keys, shapes, dtypes: cheap), values in one pass over the stacks
    excluded: dict[str, str] = {}
    candidates: list[ClientUpdate] = []
    for update in updates:
        reason: str | None
        if update.arch not in arch_specs:
            reason = f"unknown architecture {update.arch!r}"
        else:
            reason = first_problem("shared", update.shared, shared_spec, check_finite=False) or first_problem(
                "same-arch", update.same_arch, arch_specs[update.arch], check_finite=False
            )
        if reason is None and need_task_vector:
            reason = _task_vector_problem(_as_task_vector(update.task_vector), tv_shape)
        if reason is None:
            candidates.append(update)
        else:
            excluded[update.client_id] = reason

    shared_stack = _stack([u.shared for u in candidates], shared_spec)
    finite = _finite_rows(shared_stack)
    arch_stacks: dict[str, tuple[list[int], torch.Tensor]] = {}
    for arch in sorted({u.arch for u in candidates}):
        members = [i for i, u in enumerate(candidates) if u.arch == arch]
        stack = _stack([candidates[i].same_arch for i in members], arch_specs[arch])
        finite[members] &= _finite_rows(stack)
        arch_stacks[arch] = (members, stack)
    keep = [i for i in range(len(candidates)) if bool(finite[i])]
    for i in range(len(candidates)):
        if not bool(finite[i]):
            update = candidates[i]
            if not bool(_finite_rows(shared_stack[i : i + 1])[0]):
                where = f"shared {_non_finite_key(update.shared, shared_spec)!r}"
            else:
                where = f"same-arch {_non_finite_key(update.same_arch, arch_specs[update.arch])!r}"
            excluded[update.client_id] = f"non-finite values (NaN/Inf) in {where}"
    for client_id, reason in excluded.items():
        logger.warning("RELA: client %s excluded from this round: %s", client_id, reason)
    valid = [candidates[i] for i in keep]
    if len(keep) < len(candidates):
        position = {old: new for new, old in enumerate(keep)}
        shared_stack = shared_stack[keep]
        for arch, (members, stack) in list(arch_stacks.items()):
            rows = [k for k, i in enumerate(members) if i in position]
            arch_stacks[arch] = ([position[members[k]] for k in rows], stack[rows])

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
    shared_out = _unstack(_mix(weights, shared_stack, target), shared_spec)
    for update, shared in zip(valid, shared_out, strict=True):
        before = previous.get(update.client_id)
        result_globals[update.client_id] = GlobalState(shared, dict(before.same_arch) if before else {})

    for arch, (members, stack) in arch_stacks.items():
        if not members:
            continue
        block = weights[np.ix_(members, members)]
        totals = block.sum(axis=1)
        receivers = [k for k in range(len(members)) if totals[k] > 0]
        if not receivers:
            continue  # a lone client of its architecture keeps its previous plain-LoRA global
        normalised = block[receivers] / totals[receivers, None]
        mixed = _unstack(_mix(normalised, stack, target), arch_specs[arch])
        for k, state in zip(receivers, mixed, strict=True):
            result_globals[valid[members[k]].client_id].same_arch = state
    return AggregationResult(result_globals, weights, client_ids, excluded)
