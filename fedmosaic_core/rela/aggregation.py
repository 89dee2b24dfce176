"""Per-client global adapters on the server (RELA; docs/method.md, "RELA").

For the M valid clients of a round, with weight matrix W (M × M)::

    shared (PQ P/Q, every architecture):   G_i[key] = Σ_j W_ij · L_j[key]
    same-arch (plain LoRA A/B):            G_i[key] = Σ_{j ∈ arch(i)} W_ij · L_j[key] / Σ_{j ∈ arch(i)} W_ij

The clients' tensors are mixed a run of parameters at a time (a tile of M × a run of floats,
small enough to stay in cache) with one matrix product ``W @ tile`` whose extra row of ones also
finds NaN/Inf; each client's tensors are views into the result. When the M states already are
the rows of one matrix (the server decodes a round's replies that way), a tile is a column block
of it; otherwise the tensors are gathered into the tile first.

Modes:

- ``fedmosaic``: W = ``relevance_weights(task_similarity(task vectors), tau)`` (diagonal 0).
- ``fedmosaic-uniform``: W_ij = 1/(M−1) for j ≠ i (RELA off, same structure otherwise).
  With ``include_self`` (beyond the paper) both keep the client in its own mix (W_ii > 0).
- ``fedavg``: the classic baseline: P/Q *and* LoRA A/B averaged with equal weights within each
  same-architecture group, the client itself included (a client alone in its group gets its own
  local state back).
- ``local``: no sharing; every client keeps its previous global state; W is all zeros.

Exclusions: an update with NaN/Inf, a wrong shape (including a wrong rank r), an unknown or a
missing key, or (``fedmosaic`` only) a missing / wrongly shaped / non-finite task vector is left
out of the round with one ``logging`` warning naming the client and the reason; the others are
aggregated as if it had not replied. With fewer than 2 valid clients everyone keeps its previous
global state. Clients that are absent or excluded keep their previous global state. A client
with no same-architecture peer among the valid clients gets its own local same-architecture state
as that global (``peerless_global="self-copy"``, the reference's rule; under ``fedavg`` it is its
group's mean anyway); with ``peerless_global="keep"`` (beyond the paper) it keeps its previous
same-architecture global instead, zero until it has ever had a peer.

``globals`` holds an entry for every client in ``previous`` and every valid client. A part that
has nothing new and no previous value is an empty dict, meaning "keep what you have". Outputs
are float32; each tensor is a contiguous view into its tile's result (one storage per tile).
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

from fedmosaic_core.models.fingerprint import ArchitectureFingerprint
from fedmosaic_core.pqlora.state import Spec, first_problem, is_key
from fedmosaic_core.rela.similarity import relevance_weights, task_similarity

logger = logging.getLogger(__name__)

MODES = ("fedmosaic", "fedmosaic-uniform", "fedavg", "local")
#: what a client with no peer to mix with gets (the reference's copy of its own state, or nothing new)
PEERLESS_GLOBALS = ("self-copy", "keep")


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


# -- mixing ------------------------------------------------------------------------------------
#: floats per gathered tile (all clients × a run of keys): small enough to stay in cache
TILE_FLOATS = 1 << 18


def _key_runs(spec: Spec, width: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """``spec``'s keys in order, cut into runs of about ``width`` floats (a key is never split)."""
    runs: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for key, shape in spec.items():
        if runs[-1] and filled + math.prod(shape) > width:
            runs.append([])
            filled = 0
        runs[-1].append((key, shape))
        filled += math.prod(shape)
    return [run for run in runs if run]


def _mix_states(
    weights: np.ndarray, states: Sequence[Mapping[str, torch.Tensor]], spec: Spec, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """``out[i][key] = Σ_j weights[i, j] · states[j][key]`` for every key of ``spec``, and the
    indices j of states holding NaN/Inf (whose results must not be used).

    The states are mixed a run of keys at a time: a tile of clients × the run's floats, small
    enough to stay in cache, one product per tile. States that already are the rows of one
    matrix (:func:`_as_rows`) give their tiles as column blocks of it; others are gathered into a
    reused tile first. (One product over the whole matrix was slower: its large fresh result
    costs page faults on every call.) Each product carries one more row of weights, all ones: its
    output, the column sums, is finite exactly when no client holds NaN/Inf (or values near
    float32's limit), so the states are read once; only when that fails are they checked client
    by client. Every output tensor is a view into a product's result."""
    n_out = int(weights.shape[0])
    w = torch.from_numpy(np.ascontiguousarray(np.vstack([weights, np.ones((1, len(states)))]), dtype=np.float32))
    w = w.to(device)
    mixed_keys: list[tuple[torch.Tensor, ...]] = []  # per key of spec: its n_out results
    column_sums: list[torch.Tensor] = []  # one scalar per product: NaN/Inf in any client propagate into it
    stacked = _as_rows(states, spec)
    runs = _key_runs(spec, max(1, TILE_FLOATS // max(1, len(states))))
    widths = [sum(math.prod(shape) for _, shape in run) for run in runs]
    buffer = torch.empty(0 if stacked is not None else len(states) * max(widths, default=0), dtype=torch.float32)
    start = 0
    for run, width in zip(runs, widths, strict=True):
        if stacked is not None:
            tile = stacked[:, start : start + width]  # a column block: nothing to gather
        else:
            tile = buffer[: len(states) * width].view(len(states), width)  # reused: no page faults
            for row, state in zip(tile, states, strict=True):
                torch.cat([state[key].detach().reshape(-1) for key, _ in run], out=row)  # casts to float32
        start += width
        mixed = _product(w, tile, device)
        column_sums.append(mixed[n_out].sum())
        sizes = [math.prod(shape) for _, shape in run]
        for (_, shape), block in zip(run, torch.split(mixed[:n_out], sizes, dim=1), strict=True):
            mixed_keys.append(block.unflatten(1, shape).unbind(0))
    outputs = ([dict(zip(spec, results, strict=True)) for results in zip(*mixed_keys, strict=True)]
               if mixed_keys else [{} for _ in range(n_out)])
    if not column_sums or bool(torch.isfinite(torch.stack(column_sums)).all()):
        return outputs, []
    # some client holds NaN/Inf: find which, key by key (rare)
    finite = torch.ones(len(states), dtype=torch.bool)
    for key in spec:
        finite &= _finite_rows(torch.stack([state[key].detach().reshape(-1).float().cpu() for state in states]))
    return outputs, [j for j in range(len(states)) if not bool(finite[j])]


def _product(w: torch.Tensor, tile: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``w @ tile`` on ``device``, the result on the CPU."""
    mixed = w @ tile.to(device)
    return mixed if mixed.device.type == "cpu" else mixed.cpu()


def _as_rows(states: Sequence[Mapping[str, torch.Tensor]], spec: Spec) -> torch.Tensor | None:
    """The states as the rows of one float32 CPU matrix (M × D, keys in ``spec`` order) when
    every state's tensors already are views laid out so in one storage; else None. (Keys and
    shapes are checked before: every value is a tensor holding its key's numel.)"""
    if not states or not spec:
        return None
    keys = list(spec)
    first = states[0].get(keys[0])
    if not isinstance(first, torch.Tensor) or first.dtype != torch.float32 or first.device.type != "cpu":
        return None
    nbytes = [math.prod(shape) * 4 for shape in spec.values()]
    width = sum(nbytes) // 4
    storage, base = first.untyped_storage(), first.storage_offset()
    if storage.nbytes() < (base + len(states) * width) * 4:
        return None
    # allocations do not overlap: a tensor that starts at its place inside this storage is in it
    address = storage.data_ptr() + base * 4
    float32 = torch.float32
    for state in states:
        for tensor, size in zip(map(state.__getitem__, keys), nbytes, strict=True):
            if tensor.data_ptr() != address or tensor.dtype is not float32 or not tensor.is_contiguous():
                return None
            address += size
    return first.new_empty(0).set_(storage, base, (len(states), width), (width, 1))


def _finite_rows(stack: torch.Tensor) -> torch.Tensor:
    """Which rows hold only finite values, in one matrix-vector product: NaN and ±Inf propagate
    into a row's sum (so does a float32 overflow of the sum, i.e. values beyond ~1e38 / D)."""
    if stack.shape[1] == 0:
        return torch.ones(stack.shape[0], dtype=torch.bool)
    return torch.isfinite(stack @ torch.ones(stack.shape[1], dtype=stack.dtype))


def _non_finite_key(state: Mapping[str, torch.Tensor], spec: Spec) -> str | None:
    return next((key for key in spec if not bool(torch.isfinite(state[key]).all())), None)


def _weight_matrix(mode: str, valid: Sequence[ClientUpdate], tau: float, include_self: bool = False) -> np.ndarray:
    m = len(valid)
    if mode == "fedmosaic":
        similarity = task_similarity([_as_task_vector(u.task_vector) for u in valid])
        return relevance_weights(similarity, tau, include_self=include_self)
    if mode == "fedmosaic-uniform":
        return np.full((m, m), 1.0 / m) if include_self else (1.0 - np.eye(m)) / (m - 1)
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
    expected_shared: Mapping[str, Sequence[int]] | None = None,
    expected_same_arch: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    device: str | torch.device | None = None,
    norm_bound: float = 0.0,
    share_across_families: bool = True,
    include_self: bool = False,
    peerless_global: str = "self-copy",
) -> AggregationResult:
    """Build every client's global state for the next round (see the module docstring).

    ``norm_bound`` c > 0 bounds each client's contribution (beyond the paper): a client whose
    state has L2 norm ‖L_j‖ > c · median_k ‖L_k‖ (over this round's valid clients; the same-arch
    part over its architecture's) enters the mix scaled by c · median / ‖L_j‖. Since every row of
    W sums to 1 (or less), each global then has ‖G_i‖ ≤ max(c · median, the largest unscaled
    ‖L_k‖), whatever one client sends. 0 turns it off.

    ``share_across_families`` False (beyond the paper): the shared P/Q mix only within a model
    family (the architecture id's family, :mod:`fedmosaic_core.models.fingerprint`): W_ij = 0
    across families, each row renormalised; a client with no family peer gets its own state.

    ``peerless_global`` (``fedmosaic`` and ``fedmosaic-uniform``): what a client with no peer in a
    part's mix gets, in its same-architecture part (no same-architecture peer) and, with
    ``share_across_families`` False, its shared part (no family peer). ``"self-copy"`` (the
    reference): its own uploaded state of this round. ``"keep"`` (beyond the paper): that part of
    its previous global, unchanged (empty, i.e. zero, until it has had a peer).

    ``include_self`` True (beyond the paper; ``fedmosaic`` and ``fedmosaic-uniform``): W_ii > 0,
    the client's own state is in its mix: the softmax runs over every j with s_ii (1 for a non-zero
    task vector), equal weights are 1/M. ``fedavg`` includes the client anyway.

    ``expected_shared``: key → shape of the shared state, for everyone; ``expected_same_arch``:
    arch → (key → shape). When None they are inferred from the majority of this round's updates
    (per architecture for the same-arch part). ``device``: where the matrix products run (the
    new states live on the CPU).
    """
    if mode not in MODES:
        raise ValueError(f"aggregate_global_states: unknown mode {mode!r}; expected one of {MODES}")
    if not (np.isfinite(norm_bound) and norm_bound >= 0):
        raise ValueError(f"aggregate_global_states: norm_bound must be a number >= 0, got {norm_bound!r}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"aggregate_global_states: tau must be a positive number, got {tau!r}")
    if peerless_global not in PEERLESS_GLOBALS:
        raise ValueError(f"aggregate_global_states: peerless_global must be one of {PEERLESS_GLOBALS}, "
                         f"got {peerless_global!r}")
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

    # structure first (keys, shapes, dtypes: cheap); values while they are mixed
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

    target = torch.device("cpu") if device is None else torch.device(device)
    valid = list(candidates)
    while True:  # normally once; again without the clients whose values turn out non-finite
        mixed = _mix_round(mode, tau, valid, shared_spec, arch_specs, target, norm_bound, share_across_families,
                           include_self, self_copy=peerless_global == "self-copy" or mode == "fedavg")
        if not mixed.bad:
            break
        for update in mixed.bad:
            excluded[update.client_id] = _non_finite_reason(update, shared_spec, arch_specs[update.arch])
        bad = {id(u) for u in mixed.bad}
        valid = [u for u in valid if id(u) not in bad]
    for client_id, reason in excluded.items():
        logger.warning("RELA: client %s excluded from this round: %s", client_id, reason)

    client_ids = [u.client_id for u in valid]
    result_globals: dict[str, GlobalState] = {
        cid: GlobalState(dict(state.shared), dict(state.same_arch)) for cid, state in previous.items()
    }
    m = len(valid)
    if mixed.weights is None:
        if mode != "local":
            logger.warning("RELA: only %d valid client(s) this round; everyone keeps the previous global state", m)
        for cid in client_ids:
            result_globals.setdefault(cid, GlobalState())
        return AggregationResult(result_globals, np.zeros((m, m)), client_ids, excluded)
    for index, (update, shared) in enumerate(zip(valid, mixed.shared, strict=True)):
        before = previous.get(update.client_id)
        if index in mixed.kept_shared:
            shared = dict(before.shared) if before else {}
        result_globals[update.client_id] = GlobalState(shared, dict(before.same_arch) if before else {})
    for client_index, same_arch in mixed.same_arch.items():
        result_globals[valid[client_index].client_id].same_arch = same_arch
    return AggregationResult(result_globals, mixed.weights, client_ids, excluded)


@dataclass
class _MixedRound:
    weights: np.ndarray | None  # None: nothing mixed (mode local, or fewer than 2 clients)
    shared: list[dict[str, torch.Tensor]] = field(default_factory=list)
    same_arch: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # client index → state
    bad: list[ClientUpdate] = field(default_factory=list)  # clients with NaN/Inf values
    kept_shared: set[int] = field(default_factory=set)  # client indices whose shared global stays the previous


def _contribution_scales(
    states: Sequence[Mapping[str, torch.Tensor]], spec: Spec, norm_bound: float, ids: Sequence[str], part: str
) -> np.ndarray:
    """Per state: min(1, c · median norm / its norm) (1 where the bound is off or the norm is not finite)."""
    scales = np.ones(len(states))
    if norm_bound <= 0 or not states:
        return scales
    norms = np.array([math.sqrt(sum(float(state[key].detach().float().pow(2).sum()) for key in spec))
                      for state in states])
    finite = np.isfinite(norms)
    if not finite.any():
        return scales
    limit = norm_bound * float(np.median(norms[finite]))
    for j, norm in enumerate(norms):
        if finite[j] and norm > limit:
            scales[j] = limit / norm
            logger.warning("RELA: client %s's %s update has norm %.3g > %.3g (%g × the median); scaled by %.3g",
                           ids[j], part, norm, limit, norm_bound, scales[j])
    return scales


def _within_families(weights: np.ndarray, archs: Sequence[str], self_copy: bool = True) -> np.ndarray:
    """W with the cross-family entries zeroed and each row renormalised; a row left empty (no
    family peer) becomes the client's own state (``self_copy``) or stays all zero."""
    family = np.array([ArchitectureFingerprint.family_of(a) for a in archs], dtype=object)
    masked = weights * (family[:, None] == family[None, :])
    totals = masked.sum(axis=1)
    lone = totals <= 0
    if self_copy:
        masked[lone] = np.eye(len(archs))[lone]
    totals[lone] = 1.0
    return masked / totals[:, None]


def _mix_round(
    mode: str, tau: float, valid: list[ClientUpdate], shared_spec: Spec, arch_specs: dict[str, Spec],
    device: torch.device, norm_bound: float = 0.0, share_across_families: bool = True, include_self: bool = False,
    self_copy: bool = True,
) -> _MixedRound:
    """Every valid client's shared global (all architectures) and same-arch global (its own); a
    client with no peer in a part gets its own state there (``self_copy``) or nothing new."""
    if mode == "local" or len(valid) < 2:
        return _MixedRound(None, bad=[u for u in valid if _non_finite_key(u.shared, shared_spec) is not None
                                      or _non_finite_key(u.same_arch, arch_specs[u.arch]) is not None])
    weights = _weight_matrix(mode, valid, tau, include_self)
    if not share_across_families:
        weights = _within_families(weights, [u.arch for u in valid], self_copy)
    ids = [u.client_id for u in valid]
    shared_scales = _contribution_scales([u.shared for u in valid], shared_spec, norm_bound, ids, "shared")
    shared, bad_rows = _mix_states(weights * shared_scales[None, :], [u.shared for u in valid], shared_spec, device)
    result = _MixedRound(weights, shared, kept_shared={i for i in range(len(valid)) if weights[i].sum() <= 0})
    bad_rows_all = set(bad_rows)
    for arch in sorted({u.arch for u in valid}):
        members = [i for i, u in enumerate(valid) if u.arch == arch]
        block = weights[np.ix_(members, members)]
        if len(members) == 1:  # no peer: its own local state is its global, or it keeps the one it has
            block = np.ones((1, 1)) if self_copy else np.zeros((1, 1))
        totals = block.sum(axis=1)
        receivers = [k for k in range(len(members)) if totals[k] > 0]
        normalised = block[receivers] / totals[receivers, None] if receivers else np.zeros((0, len(members)))
        states = [valid[i].same_arch for i in members]
        scales = _contribution_scales(states, arch_specs[arch], norm_bound if receivers else 0.0,
                                      [ids[i] for i in members], "same-arch")
        mixed, bad_members = _mix_states(normalised * scales[None, :], states, arch_specs[arch], device)
        bad_rows_all.update(members[k] for k in bad_members)
        for k, state in zip(receivers, mixed, strict=True):
            result.same_arch[members[k]] = state
    result.bad = [valid[i] for i in sorted(bad_rows_all)]
    return result


def _non_finite_reason(update: ClientUpdate, shared_spec: Spec, same_arch_spec: Spec) -> str:
    shared_key = _non_finite_key(update.shared, shared_spec)
    same_key = _non_finite_key(update.same_arch, same_arch_spec)
    if shared_key is None and same_key is None:
        return "values too large (their sum overflows float32)"
    where = f"shared {shared_key!r}" if shared_key is not None else f"same-arch {same_key!r}"
    return f"non-finite values (NaN/Inf) in {where}"
