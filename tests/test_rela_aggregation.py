"""Per-client aggregation: matrix products vs a slow reference loop, modes, bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedmosaic_core.models.fingerprint import ArchitectureFingerprint
from fedmosaic_core.rela import (
    AggregationResult,
    ClientUpdate,
    GlobalState,
    aggregate_global_states,
    relevance_weights,
    task_similarity,
)

R = 4
MODULES = ("q_proj", "down_proj")
# Two PQ blocks in this toy setting; LoRA layers differ per architecture.
ARCH_LORA = {
    "llama-s": {"lora.0.q_proj": (6, 6), "lora.0.down_proj": (6, 10)},  # (d_out, d_in)
    "llama-m": {"lora.0.q_proj": (8, 8), "lora.2.down_proj": (8, 12)},
    "qwen-s": {"lora.1.q_proj": (5, 5)},
}
TV_SHAPE = (6, 10)


def _shared(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k in range(2):
        for module in MODULES:
            out[f"pq.{k}.{module}.P"] = torch.randn(R, R, generator=gen)
            out[f"pq.{k}.{module}.Q"] = torch.randn(R, generator=gen)
    return out


def _same_arch(arch: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, (d_out, d_in) in ARCH_LORA[arch].items():
        out[f"{prefix}.A"] = torch.randn(R, d_in, generator=gen)
        out[f"{prefix}.B"] = torch.randn(d_out, R, generator=gen)
    return out


ARCHS = ["llama-s", "llama-m", "llama-s", "qwen-s", "llama-m", "llama-s"]  # qwen-s is alone


def _updates(seed: int = 0, archs: list[str] = ARCHS) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=TV_SHAPE)
    updates = []
    for i, arch in enumerate(archs):
        tv = base + rng.normal(size=TV_SHAPE) * (0.5 + i)  # varied relatedness
        updates.append(ClientUpdate(f"c{i}", arch, _shared(gen), _same_arch(arch, gen), tv.astype(np.float32)))
    return updates


def _previous(updates: list[ClientUpdate], seed: int = 99) -> dict[str, GlobalState]:
    gen = torch.Generator().manual_seed(seed)
    return {u.client_id: GlobalState(_shared(gen), _same_arch(u.arch, gen)) for u in updates}


def _slow_reference(
    updates: list[ClientUpdate], previous: dict[str, GlobalState], weights: np.ndarray
) -> dict[str, GlobalState]:
    """G_i = Σ_j w_ij L_j (shared); same-arch: Σ_{j same arch} w_ij L_j / Σ_{j same arch} w_ij."""
    out = {}
    for i, ui in enumerate(updates):
        shared = {}
        for key in ui.shared:
            total = torch.zeros_like(ui.shared[key], dtype=torch.float64)
            for j, uj in enumerate(updates):
                total += float(weights[i, j]) * uj.shared[key].double()
            shared[key] = total
        peers = [j for j, uj in enumerate(updates) if uj.arch == ui.arch]
        norm = sum(float(weights[i, j]) for j in peers)
        if peers == [i]:  # no peer: its own local state
            same_arch = {key: value.double() for key, value in ui.same_arch.items()}
        elif norm == 0.0:
            same_arch = previous[ui.client_id].same_arch
        else:
            same_arch = {}
            for key in ui.same_arch:
                total = torch.zeros_like(ui.same_arch[key], dtype=torch.float64)
                for j in peers:
                    total += float(weights[i, j]) / norm * updates[j].same_arch[key].double()
                same_arch[key] = total
        out[ui.client_id] = GlobalState(shared, same_arch)
    return out


def _assert_states_close(got: GlobalState, want: GlobalState) -> None:
    assert set(got.shared) == set(want.shared) and set(got.same_arch) == set(want.same_arch)
    for part_got, part_want in ((got.shared, want.shared), (got.same_arch, want.same_arch)):
        for key, value in part_want.items():
            assert part_got[key].dtype == torch.float32 and part_got[key].shape == value.shape
            torch.testing.assert_close(part_got[key].double(), value.double(), rtol=1e-5, atol=1e-5)


def _expected_weights(mode: str, updates: list[ClientUpdate]) -> np.ndarray:
    n = len(updates)
    if mode == "fedmosaic":
        return relevance_weights(task_similarity([u.task_vector for u in updates]), 0.5)
    if mode == "fedmosaic-uniform":
        return (np.ones((n, n)) - np.eye(n)) / (n - 1)
    same = np.array([[float(a.arch == b.arch) for b in updates] for a in updates])
    return same / same.sum(axis=1, keepdims=True)  # fedavg: the client itself included


@pytest.mark.parametrize("mode", ["fedmosaic", "fedmosaic-uniform", "fedavg"])
def test_customised_states_match_slow_reference(mode: str) -> None:
    updates = _updates()
    previous = _previous(updates)
    result = aggregate_global_states(updates, previous, mode=mode)
    assert isinstance(result, AggregationResult)
    assert result.client_ids == [u.client_id for u in updates] and result.excluded == {}
    weights = _expected_weights(mode, updates)
    np.testing.assert_allclose(result.weights, weights, atol=1e-12)
    reference = _slow_reference(updates, previous, weights)
    for cid, want in reference.items():
        _assert_states_close(result.globals[cid], want)
    # the lone qwen-s client (c3): its plain-LoRA global is its own local state, in every mode
    # (RELA: as the reference does; FedAvg: the group mean of a group of one); its P/Q still mix
    lone = result.globals["c3"]
    assert set(lone.same_arch) == set(updates[3].same_arch)
    for key, value in updates[3].same_arch.items():
        assert torch.equal(lone.same_arch[key], value) and not torch.equal(value, previous["c3"].same_arch[key])
    if mode != "fedavg":  # FedAvg averages P/Q within the architecture too
        assert not torch.equal(lone.shared["pq.0.q_proj.P"], updates[3].shared["pq.0.q_proj.P"])


def test_rela_weights_favour_related_clients_and_cross_architectures() -> None:
    updates = _updates()
    result = aggregate_global_states(updates, {}, mode="fedmosaic")
    w = result.weights
    assert np.all(np.diag(w) == 0) and np.allclose(w.sum(axis=1), 1.0)
    # c0 (least noisy) is most related to c1 (the next least noisy), regardless of architecture
    assert int(np.argmax(w[0])) == 1 and updates[0].arch != updates[1].arch


def test_local_mode_keeps_previous_and_absent_clients_keep_previous() -> None:
    updates = _updates()
    previous = _previous(updates)
    previous["absent"] = GlobalState({"pq.0.q_proj.P": torch.ones(R, R)}, {})
    local = aggregate_global_states(updates, previous, mode="local")
    assert np.all(local.weights == 0)
    for cid, state in previous.items():
        for key, value in state.shared.items():
            assert torch.equal(local.globals[cid].shared[key], value)
    result = aggregate_global_states(updates[:4], previous, mode="fedmosaic")
    assert torch.equal(result.globals["absent"].shared["pq.0.q_proj.P"], torch.ones(R, R))
    for cid in ("c4", "c5"):  # did not reply this round
        assert torch.equal(result.globals[cid].shared["pq.1.down_proj.Q"], previous[cid].shared["pq.1.down_proj.Q"])


def _corrupt(kind: str, update: ClientUpdate) -> str:
    """Damage one update in place; return a substring of the expected reason."""
    if kind == "nan_shared":
        update.shared["pq.1.q_proj.P"][0, 0] = float("nan")
        return "non-finite values (NaN/Inf) in shared 'pq.1.q_proj.P'"
    if kind == "inf_same_arch":
        update.same_arch["lora.0.down_proj.B"][1, 1] = float("inf")
        return "non-finite values (NaN/Inf) in same-arch 'lora.0.down_proj.B'"
    if kind == "wrong_shape":
        update.shared["pq.0.down_proj.Q"] = torch.zeros(R, 2)
        return "wrong shape: shared 'pq.0.down_proj.Q'"
    if kind == "wrong_r":
        update.shared = {k: (torch.zeros(R - 1, R - 1) if k.endswith("P") else torch.zeros(R - 1)) for k in update.shared}
        return "wrong rank r=3 (expected r=4)"
    if kind == "wrong_lora_r":
        update.same_arch["lora.0.q_proj.A"] = torch.zeros(R + 2, 6)
        return "wrong rank r=6 (expected r=4)"
    if kind == "unknown_key":
        update.shared["pq.7.q_proj.P"] = torch.zeros(R, R)
        return "unknown shared key 'pq.7.q_proj.P'"
    if kind == "malformed_key":
        update.same_arch["gate.0.q_proj.weight"] = torch.zeros(1)
        return "malformed same-arch key 'gate.0.q_proj.weight'"
    if kind == "missing_key":
        del update.shared["pq.1.down_proj.P"]
        return "missing shared key 'pq.1.down_proj.P'"
    if kind == "tv_shape":
        update.task_vector = np.ones((TV_SHAPE[0], TV_SHAPE[1] + 1), dtype=np.float32)
        return "task vector has shape (6, 11), expected (6, 10)"
    if kind == "tv_nan":
        assert update.task_vector is not None
        update.task_vector[2, 3] = np.nan
        return "task vector has non-finite values"
    if kind == "tv_missing":
        update.task_vector = None
        return "no task vector"
    if kind == "not_tensor":
        update.shared["pq.0.q_proj.Q"] = np.zeros(R)  # type: ignore[assignment]
        return "is not a floating-point torch.Tensor"
    raise AssertionError(kind)


BAD_KINDS = [
    "nan_shared", "inf_same_arch", "wrong_shape", "wrong_r", "wrong_lora_r", "unknown_key",
    "malformed_key", "missing_key", "tv_shape", "tv_nan", "tv_missing", "not_tensor",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_update_is_excluded_with_one_log_line(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    updates = _updates()
    previous = _previous(updates)
    bad = updates[2]  # a llama-s client (llama-s has 3 members, so majority inference works)
    reason = _corrupt(kind, bad)
    with caplog.at_level(logging.WARNING, logger="fedmosaic_core.rela.aggregation"):
        result = aggregate_global_states(updates, previous, mode="fedmosaic")
    assert list(result.excluded) == ["c2"] and reason in result.excluded["c2"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "c2" in lines[0] and reason in lines[0]
    # the others are aggregated as if c2 had not replied; c2 keeps its previous global
    clean = aggregate_global_states([u for u in _updates() if u.client_id != "c2"], previous, mode="fedmosaic")
    assert result.client_ids == clean.client_ids
    np.testing.assert_allclose(result.weights, clean.weights)
    for cid in clean.client_ids:
        _assert_states_close(result.globals[cid], clean.globals[cid])
    _assert_states_close(result.globals["c2"], previous["c2"])


def test_explicit_expected_shapes_catch_a_consistent_wrong_rank() -> None:
    updates = _updates(archs=["llama-s", "llama-s", "qwen-s"])
    expected_shared = {k: tuple(v.shape) for k, v in updates[0].shared.items()}
    expected_same_arch = {a: {k: tuple(v.shape) for k, v in _same_arch(a, torch.Generator()).items()} for a in ("llama-s", "qwen-s")}
    for u in updates[1:]:
        _corrupt("wrong_r", u)  # now the majority has r = 3
    result = aggregate_global_states(
        updates, {}, mode="fedmosaic-uniform", expected_shared=expected_shared, expected_same_arch=expected_same_arch
    )
    assert set(result.excluded) == {"c1", "c2"} and result.client_ids == ["c0"]
    assert result.globals["c0"] == GlobalState()  # fewer than 2 valid: nothing new, no previous


def test_unknown_architecture_is_excluded_when_shapes_are_given() -> None:
    updates = _updates(archs=["llama-s", "llama-s", "llama-m"])
    expected_same_arch = {"llama-s": {k: tuple(v.shape) for k, v in updates[0].same_arch.items()}}
    result = aggregate_global_states(updates, {}, mode="fedmosaic", expected_same_arch=expected_same_arch)
    assert result.excluded == {"c2": "unknown architecture 'llama-m'"}


def test_fewer_than_two_valid_clients_everyone_keeps_previous() -> None:
    updates = _updates(archs=["llama-s", "llama-s", "llama-s"])
    previous = _previous(updates)
    _corrupt("tv_nan", updates[0])
    _corrupt("tv_missing", updates[1])
    result = aggregate_global_states(updates, previous, mode="fedmosaic")
    assert set(result.excluded) == {"c0", "c1"} and result.client_ids == ["c2"]
    assert result.weights.shape == (1, 1)
    for cid, state in previous.items():
        _assert_states_close(result.globals[cid], state)


def test_argument_errors() -> None:
    updates = _updates()
    with pytest.raises(ValueError, match="unknown mode 'fedprox'"):
        aggregate_global_states(updates, {}, mode="fedprox")
    with pytest.raises(ValueError, match="tau"):
        aggregate_global_states(updates, {}, tau=0.0)
    with pytest.raises(ValueError, match="duplicate client ids"):
        aggregate_global_states(updates + [updates[0]], {})
    with pytest.raises(ValueError, match="malformed key"):
        aggregate_global_states(updates, {}, expected_shared={"P": (4, 4)})


def test_an_empty_same_architecture_part_is_aggregated() -> None:
    """Models whose every adapted layer is a PQ layer have no plain LoRA to share."""
    updates = [
        ClientUpdate(f"c{i}", "arch", {"pq.0.q_proj.P": torch.full((2, 2), float(i)), "pq.0.q_proj.Q": torch.ones(2)},
                     {}, np.eye(2, dtype=np.float32) + i)
        for i in range(3)
    ]
    result = aggregate_global_states(updates, {}, mode="fedmosaic-uniform")
    assert not result.excluded
    torch.testing.assert_close(result.globals["c0"].shared["pq.0.q_proj.P"], torch.full((2, 2), 1.5))
    assert result.globals["c1"].same_arch == {}


def _flat_norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([v.double().reshape(-1) for v in state.values()]).norm())


@pytest.mark.parametrize("mode", ["fedmosaic", "fedmosaic-uniform", "fedavg"])
def test_norm_bound_changes_nothing_when_no_client_exceeds_it(mode: str) -> None:
    updates = _updates(4)
    plain = aggregate_global_states(updates, {}, mode=mode)
    bounded = aggregate_global_states(updates, {}, mode=mode, norm_bound=3.0)
    for cid, state in plain.globals.items():
        for part in ("shared", "same_arch"):
            for key, value in getattr(state, part).items():
                assert torch.equal(getattr(bounded.globals[cid], part)[key], value)


def test_norm_bound_limits_a_client_scaled_a_million_times(caplog: pytest.LogCaptureFixture) -> None:
    """One client sends P/Q and LoRA × 10⁶ (finite, valid shapes). Unbounded, every honest global
    grows by orders of magnitude; with c = 3 each global's norm stays ≤ c × the median norm
    (all honest norms are below that), the bound the docstring states."""
    updates = _updates(5)
    attacker = updates[2]  # llama-s, shares an architecture with c0 and c5
    attacker.shared = {k: v * 1e6 for k, v in attacker.shared.items()}
    attacker.same_arch = {k: v * 1e6 for k, v in attacker.same_arch.items()}
    honest = [u for u in updates if u is not attacker]
    unbounded = aggregate_global_states(updates, {}, mode="fedmosaic")
    with caplog.at_level(logging.WARNING):
        bounded = aggregate_global_states(updates, {}, mode="fedmosaic", norm_bound=3.0)
    shared_median = float(np.median([_flat_norm(u.shared) for u in updates]))
    llama_s = [u for u in updates if u.arch == "llama-s"]
    same_median = float(np.median([_flat_norm(u.same_arch) for u in llama_s]))
    assert max(_flat_norm(u.shared) for u in honest) < 3.0 * shared_median
    for u in honest:
        assert _flat_norm(unbounded.globals[u.client_id].shared) > 1e4 * shared_median
        assert _flat_norm(bounded.globals[u.client_id].shared) <= 3.0 * shared_median * (1 + 1e-6)
    for u in llama_s:
        if u is not attacker:
            assert _flat_norm(bounded.globals[u.client_id].same_arch) <= 3.0 * same_median * (1 + 1e-6)
    assert any("client c2's shared update has norm" in r.getMessage() for r in caplog.records)
    assert any("client c2's same-arch update has norm" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(bounded.weights, unbounded.weights)  # relevance is not touched
    with pytest.raises(ValueError, match="norm_bound must be a number >= 0"):
        aggregate_global_states(updates, {}, norm_bound=-1.0)


def _as_round_matrix(updates: list[ClientUpdate], order: list[int] | None = None) -> list[ClientUpdate]:
    """The updates with their shared states copied into the rows of one matrix (sorted keys), as
    the strategy decodes them; ``order``: which row each update's state goes to."""
    spec = sorted(updates[0].shared)
    width = sum(updates[0].shared[k].numel() for k in spec)
    rows = torch.empty(len(updates), width)
    out = []
    for j, update in enumerate(updates):
        row, views, offset = rows[(order or list(range(len(updates))))[j]], {}, 0
        for key in spec:
            value = update.shared[key]
            row[offset : offset + value.numel()] = value.reshape(-1)
            views[key] = row[offset : offset + value.numel()].view(value.shape)
            offset += value.numel()
        out.append(ClientUpdate(update.client_id, update.arch, views, update.same_arch, update.task_vector))
    return out


@pytest.mark.parametrize("order", [None, [1, 0, 2, 3, 4, 5]])
def test_states_decoded_into_one_matrix_are_mixed_in_place_with_the_same_result(
    order: list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of one matrix in update order are mixed without gathering (one product); any other
    layout (here two rows swapped) is gathered as before. Both give the separate tensors' result."""
    import fedmosaic_core.rela.aggregation as aggregation

    found: list[bool] = []
    real = aggregation._as_rows
    monkeypatch.setattr(aggregation, "_as_rows", lambda states, spec: found.append(real(states, spec) is not None) or real(states, spec))
    updates = _updates()
    expected = aggregate_global_states(updates, {}, mode="fedmosaic")
    found.clear()
    got = aggregate_global_states(_as_round_matrix(updates, order), {}, mode="fedmosaic")
    assert found[0] is (order is None)  # the shared part: in place exactly when the rows are in order
    for cid, state in expected.globals.items():
        for key, value in {**state.shared, **state.same_arch}.items():
            assert torch.equal(got.globals[cid].shared.get(key, got.globals[cid].same_arch.get(key)), value)


def test_a_nan_row_of_the_round_matrix_excludes_only_its_client() -> None:
    updates = _updates()
    stacked = _as_round_matrix(updates)
    stacked[2].shared["pq.1.down_proj.Q"][0] = float("nan")
    result = aggregate_global_states(stacked, {}, mode="fedmosaic")
    assert set(result.excluded) == {"c2"} and "non-finite" in result.excluded["c2"]
    reference = aggregate_global_states([u for u in updates if u.client_id != "c2"], {}, mode="fedmosaic")
    for cid in reference.client_ids:
        for key, value in reference.globals[cid].shared.items():
            torch.testing.assert_close(result.globals[cid].shared[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["fedmosaic", "fedmosaic-uniform"])
def test_include_self_keeps_the_client_in_its_own_mix(mode: str) -> None:
    """``include_self``: W_ii > 0 (RELA: the softmax over every j; uniform: 1/M), and every global
    is Σ_j W_ij L_j over all j (plain LoRA: over the architecture group, renormalised)."""
    updates = _updates()
    previous = _previous(updates)
    result = aggregate_global_states(updates, previous, mode=mode, include_self=True)
    n = len(updates)
    weights = (relevance_weights(task_similarity([u.task_vector for u in updates]), 0.5, include_self=True)
               if mode == "fedmosaic" else np.full((n, n), 1.0 / n))
    np.testing.assert_allclose(result.weights, weights, atol=1e-12)
    assert np.all(np.diag(result.weights) > 0) and np.allclose(result.weights.sum(axis=1), 1.0)
    for cid, want in _slow_reference(updates, previous, weights).items():
        _assert_states_close(result.globals[cid], want)
    without = aggregate_global_states(updates, previous, mode=mode)
    assert not torch.equal(result.globals["c0"].shared["pq.0.q_proj.P"], without.globals["c0"].shared["pq.0.q_proj.P"])


def test_within_families_the_shared_mix_leaves_other_families_out() -> None:
    """``share_across_families=False``: W_ij = 0 across model families, rows renormalised; the lone
    qwen2 client gets its own P/Q back; the llama clients mix only llama clients' P/Q."""
    ids = {"llama-s": "llama-d64-L4-ff176-q64-kv32-r16", "llama-m": "llama-d96-L8-ff256-q96-kv32-r16",
           "qwen-s": "qwen2-d64-L4-ff176-q64-kv32-r16"}
    arch_family = ArchitectureFingerprint.family_of
    assert arch_family(ids["llama-m"]) == "llama" and arch_family(ids["qwen-s"]) == "qwen2"
    updates = _updates()
    for u in updates:
        u.arch = ids[u.arch]
    across = aggregate_global_states(updates, {}, mode="fedmosaic")
    result = aggregate_global_states(updates, {}, mode="fedmosaic", share_across_families=False)
    w, lone = result.weights, ARCHS.index("qwen-s")
    llama = [i for i, a in enumerate(ARCHS) if a != "qwen-s"]
    assert np.allclose(w.sum(axis=1), 1.0) and np.all(w[llama, lone] == 0) and w[lone, lone] == 1.0
    np.testing.assert_allclose(w[np.ix_(llama, llama)], across.weights[np.ix_(llama, llama)]
                               / across.weights[np.ix_(llama, llama)].sum(axis=1, keepdims=True), rtol=1e-12)
    for i, u in enumerate(updates):
        for key in u.shared:
            want = sum(float(w[i, j]) * updates[j].shared[key].double() for j in range(len(updates)))
            torch.testing.assert_close(result.globals[u.client_id].shared[key].double(), want, rtol=1e-5, atol=1e-5)
    for key, value in updates[lone].shared.items():
        torch.testing.assert_close(result.globals[updates[lone].client_id].shared[key], value)
    for u in updates:  # the same-architecture part is unchanged by the option
        for key, value in across.globals[u.client_id].same_arch.items():
            torch.testing.assert_close(result.globals[u.client_id].same_arch[key], value)


@pytest.mark.parametrize("mode", ["fedmosaic", "fedmosaic-uniform"])
def test_peerless_keep_leaves_a_lone_client_its_previous_same_arch_global(mode: str) -> None:
    """``peerless_global="keep"``: the lone qwen-s client's plain-LoRA global is its previous one
    (nothing new: empty when it never had one), not a copy of its upload; everything else is as
    with the reference's self-copy."""
    updates = _updates()
    previous = _previous(updates)
    copy = aggregate_global_states(updates, previous, mode=mode)
    keep = aggregate_global_states(updates, previous, mode=mode, peerless_global="keep")
    lone = ARCHS.index("qwen-s")
    lone_id = updates[lone].client_id
    np.testing.assert_array_equal(keep.weights, copy.weights)
    for key, value in previous[lone_id].same_arch.items():
        assert torch.equal(keep.globals[lone_id].same_arch[key], value)
        assert not torch.equal(keep.globals[lone_id].same_arch[key], copy.globals[lone_id].same_arch[key])
    for u in updates:
        for part in ("shared", "same_arch"):
            if part == "same_arch" and u.client_id == lone_id:
                continue
            for key, value in getattr(copy.globals[u.client_id], part).items():
                assert torch.equal(getattr(keep.globals[u.client_id], part)[key], value), (u.client_id, key)
    fresh = aggregate_global_states(updates, {}, mode=mode, peerless_global="keep")
    assert fresh.globals[lone_id].same_arch == {} and set(fresh.globals[lone_id].shared) == set(updates[lone].shared)


def test_peerless_keep_within_families_leaves_a_client_without_family_peers_its_previous_global() -> None:
    """With ``share_across_families=False`` the qwen2 client has no peer in either part: "keep"
    gives it its whole previous global back (its weight row is all zero); the llama rows are the
    same as with the self-copy."""
    ids = {"llama-s": "llama-d64-L4-ff176-q64-kv32-r16", "llama-m": "llama-d96-L8-ff256-q96-kv32-r16",
           "qwen-s": "qwen2-d64-L4-ff176-q64-kv32-r16"}
    updates = _updates()
    previous = _previous(updates)
    for u in updates:
        u.arch = ids[u.arch]
    copy = aggregate_global_states(updates, previous, mode="fedmosaic", share_across_families=False)
    keep = aggregate_global_states(updates, previous, mode="fedmosaic", share_across_families=False,
                                   peerless_global="keep")
    lone = ARCHS.index("qwen-s")
    lone_id = updates[lone].client_id
    assert np.all(keep.weights[lone] == 0) and copy.weights[lone, lone] == 1.0
    llama = [i for i in range(len(updates)) if i != lone]
    np.testing.assert_array_equal(keep.weights[llama], copy.weights[llama])
    for part in ("shared", "same_arch"):
        for key, value in getattr(previous[lone_id], part).items():
            assert torch.equal(getattr(keep.globals[lone_id], part)[key], value), key
    for i in llama:
        cid = updates[i].client_id
        for part in ("shared", "same_arch"):
            for key, value in getattr(copy.globals[cid], part).items():
                assert torch.equal(getattr(keep.globals[cid], part)[key], value), (cid, key)
    fresh = aggregate_global_states(updates, {}, mode="fedmosaic", share_across_families=False, peerless_global="keep")
    assert fresh.globals[lone_id].shared == {} and fresh.globals[lone_id].same_arch == {}


def test_peerless_keep_does_not_change_fedavg_and_a_wrong_value_is_refused() -> None:
    """FedAvg's lone client gets its group mean (itself) whatever ``peerless_global`` says."""
    updates = _updates()
    previous = _previous(updates)
    copy = aggregate_global_states(updates, previous, mode="fedavg")
    keep = aggregate_global_states(updates, previous, mode="fedavg", peerless_global="keep")
    for u in updates:
        for part in ("shared", "same_arch"):
            for key, value in getattr(copy.globals[u.client_id], part).items():
                assert torch.equal(getattr(keep.globals[u.client_id], part)[key], value)
    with pytest.raises(ValueError, match="peerless_global must be one of .*'zero'"):
        aggregate_global_states(updates, previous, peerless_global="zero")
