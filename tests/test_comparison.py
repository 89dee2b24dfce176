"""Comparison statistics on hand-made run summaries: intervals, paired differences, AUROC, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedmosaic_cli.comparison import (
    build_comparison,
    mean_interval,
    relevance_auroc,
    roc_auc,
    write_comparison,
)


def test_mean_interval_is_the_t_interval() -> None:
    stat = mean_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert math.isclose(stat["ci95"], 4.302652729 / math.sqrt(3), rel_tol=1e-6)  # t(0.975, 2) · s / √n, s = 1
    assert math.isnan(mean_interval([0.5])["ci95"]) and mean_interval([float("nan")])["n"] == 0


def test_stale_clients_from_the_summary_or_its_self_curve() -> None:
    from fedmosaic_cli.comparison import clients_with_stale_scores
    from server_app.report import summarise

    rows = [{"client": c, "round": r, "scores": {"self": {"t": 0.5}}} for c in ("0", "1") for r in (1, 2, 3)]
    rows = [r for r in rows if not (r["client"] == "1" and r["round"] == 3)]  # client 1 missed round 3
    summary = summarise(rows)
    assert summary["clients"]["1"]["last_round"] == 2
    assert clients_with_stale_scores(summary, 3) == ["1"] and clients_with_stale_scores(summary, 2) == []
    older = {"clients": {"0": {"self_curve": [[1, 0.4], [3, 0.5]]}, "1": {"self_curve": []}}}
    assert clients_with_stale_scores(older, 3) == ["1"]


def test_stale_clients_under_a_fraction_of_clients_per_round() -> None:
    """With ``fraction-train`` < 1 a client is due only at the last round it was selected for:
    one not selected in the last round is not stale, one selected but silent is."""
    from fedmosaic_cli.comparison import clients_with_stale_scores
    from server_app.report import summarise

    outcomes = [{"round": 1, "selected": ["0", "1", "2"], "missing": [], "excluded": {}},
                {"round": 2, "selected": ["0", "2"], "missing": [], "excluded": {}},
                {"round": 3, "selected": ["0", "2"], "missing": ["2"], "excluded": {}}]
    rows = [{"client": c, "round": r, "scores": {"self": {"t": 0.5}}}
            for c, r in [("0", 1), ("1", 1), ("2", 1), ("0", 2), ("2", 2), ("0", 3)]]
    summary = summarise(rows, outcomes)
    assert summary["last_selected_round"] == {"0": 3, "1": 1, "2": 3}
    assert summary["left_out"] == {"2": {"3": "did not reply in time"}}
    assert clients_with_stale_scores(summary, None) == ["2"]
    assert clients_with_stale_scores(summary, 3) == ["1", "2"]  # at fraction 1 every client is due at the end


def test_roc_auc_counts_ties_half() -> None:
    assert roc_auc([0.9, 0.8, 0.1], [True, False, False]) == 1.0
    assert roc_auc([0.1, 0.8, 0.9], [True, False, False]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(roc_auc([0.5], [True]))


def _run(tmp: Path, name: str, seed: int, self_by_client: dict[str, float], others: float = 0.3) -> dict:  # type: ignore[type-arg]
    clients = {c: {"model_id": "m-a" if int(c) % 2 == 0 else "m-b", "self_last": v} for c, v in self_by_client.items()}
    overall = {"self_last": float(np.mean(list(self_by_client.values()))), "self_auc": 0.4, "others_last": others,
               "unseen_last": float("nan"), "bytes_up_per_round": 2048.0 * (1 + seed), "bytes_down_per_round": 1024.0}
    run_dir = tmp / f"{name}-{seed}"
    run_dir.mkdir()
    (run_dir / "rounds.jsonl").write_text("".join(
        json.dumps({"round": r, "client": c, "train_loss": 0.5 + 0.1 * r + seed}) + "\n"
        for r in (1, 2) for c in self_by_client))
    return {"seed": seed, "run_dir": str(run_dir), "clients": clients, "overall": overall}


def test_paired_differences_are_per_seed(tmp_path: Path) -> None:
    per_seed = {
        "local": [_run(tmp_path, "local", s, {"0": 0.5 + 0.1 * s, "1": 0.5}) for s in range(3)],
        # better by exactly 4 points of the client mean on every seed, whatever the seed's level
        "fedmosaic": [_run(tmp_path, "fm", s, {"0": 0.58 + 0.1 * s, "1": 0.5}) for s in range(3)],
    }
    comparison = build_comparison(per_seed, reference="local", chance={"0": 0.25, "1": 0.5}, group_of={"0": "a", "1": "b"})
    paired = comparison["methods"]["fedmosaic"]["vs_reference"]["self_last"]
    assert math.isclose(paired["mean"], 0.04, abs_tol=1e-12) and paired["ci95"] < 1e-9  # no seed noise left
    unpaired = comparison["methods"]["fedmosaic"]["self_last"]
    assert unpaired["ci95"] > 0.05  # the seeds' spread, which pairing removes
    assert "vs_reference" not in comparison["methods"]["local"]
    assert comparison["methods"]["local"]["models"]["m-b"]["mean"] == 0.5
    table = write_comparison(comparison, tmp_path / "out")
    assert "| fedmosaic | +4.0 ± 0.0 |" in table
    assert "| 0 | a | m-a | 25.0 |" in table
    assert comparison["methods"]["local"]["train_loss"]["max"] == pytest.approx(2.7)  # seed 2, round 2
    assert "local 2.70" in table
    # per base model and round, over its clients and the seeds: 0.5 + 0.1·round + mean seed (1)
    assert comparison["methods"]["local"]["train_loss"]["by_model_round"] == {"m-a": pytest.approx([1.6, 1.7]),
                                                                              "m-b": pytest.approx([1.6, 1.7])}
    assert "| local | m-a | 1.60 | 1.70 |" in table
    assert "local ↑ 4 KiB ↓ 1 KiB" in table  # (2 + 4 + 6) KiB / 3 seeds up
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())  # strict JSON: NaN → null
    assert saved["methods"]["local"]["unseen_last"]["mean"] is None
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_relevance_auroc_from_the_last_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    directions = {"a": rng.normal(size=(4, 6)), "b": rng.normal(size=(4, 6))}
    groups = {"0": "a", "1": "a", "2": "a", "3": "b", "4": "b", "5": "b"}
    tensors = {f"task-vectors/{c}": torch.tensor(directions[g] + 0.05 * rng.normal(size=(4, 6)), dtype=torch.float32)
               for c, g in groups.items()}
    for round_ in (1, 2):
        folder = tmp_path / "checkpoints" / f"round-{round_:04d}"
        folder.mkdir(parents=True)
        if round_ == 2:
            save_file(tensors, str(folder / "state.safetensors"))
        else:  # an older checkpoint with the groups mixed up must not be the one read
            save_file({k: torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32)) for k in tensors},
                      str(folder / "state.safetensors"))
    assert relevance_auroc(tmp_path, groups) == pytest.approx(1.0)
    swapped = {c: ("b" if g == "a" else "a") if c in ("0", "3") else g for c, g in groups.items()}
    assert relevance_auroc(tmp_path, swapped) < 0.7
    assert math.isnan(relevance_auroc(tmp_path / "none", groups))


def test_chance_levels_and_groups_of_drake_mini(tmp_path: Path) -> None:
    from drake_data.mini import build_drake_mini
    from fedmosaic_cli.comparison import client_chance_and_groups

    root = build_drake_mini(tmp_path / "mini", seed=0, size="tiny")
    own, others, groups = client_chance_and_groups(root, root / "scenario-two-families.json")
    assert own["0"] == pytest.approx((0.25 + 0.5) / 2)  # name the digit (4 options), then parity (yes/no)
    assert groups == {str(c): ("digits", "colours", "animals")[c // 3] for c in range(9)}
    assert all(0.25 < v < 0.5 for v in others.values())


def _scored_run(tmp: Path, name: str, seed: int, own: float, other: float) -> dict:  # type: ignore[type-arg]
    """Two clients (skills a and b), two rounds; in the last, every other-client task of the
    client's own skill scores ``own`` and every task of the other skill ``other``."""
    tasks = {"0": ["A-0"], "1": ["B-0"]}
    others = {"0": {"A-1": own, "B-0": other, "B-1": other}, "1": {"B-1": own, "A-0": other}}
    run_dir = tmp / f"{name}-{seed}"
    run_dir.mkdir()
    rows = [{"round": r, "client": c, "scores": {"self": {t: 0.5 for t in tasks[c]},
                                                 "others": others[c] if r == 2 else {t: 0.0 for t in others[c]}}}
            for r in (1, 2) for c in tasks]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    clients = {c: {"model_id": "m", "self_last": 0.5} for c in tasks}
    overall = {"self_last": 0.5, "self_auc": 0.5, "others_last": 0.5, "unseen_last": float("nan")}
    return {"seed": seed, "run_dir": str(run_dir), "clients": clients, "overall": overall}


def test_others_are_split_into_the_clients_own_skills_and_the_rest(tmp_path: Path) -> None:
    skills = {"A-0": "a", "A-1": "a", "B-0": "b", "B-1": "b"}
    per_seed = {
        "local": [_scored_run(tmp_path, "local", s, own=0.6, other=0.25 + 0.01 * s) for s in range(3)],
        # the same on its own skill's tasks, 10 points better on the other skill's in every seed
        "fedavg": [_scored_run(tmp_path, "fedavg", s, own=0.6, other=0.35 + 0.01 * s) for s in range(3)],
    }
    comparison = build_comparison(per_seed, reference="local", skill_of=skills)
    fedavg = comparison["methods"]["fedavg"]
    assert math.isclose(fedavg["others_by_skill"]["others_own_skill"]["mean"], 0.6)
    assert math.isclose(fedavg["others_by_skill"]["others_other_skills"]["mean"], 0.36)
    paired = fedavg["others_by_skill_vs_reference"]
    assert math.isclose(paired["others_other_skills"]["mean"], 0.10) and paired["others_other_skills"]["ci95"] < 1e-9
    assert math.isclose(paired["others_own_skill"]["mean"], 0.0, abs_tol=1e-12)
    table = write_comparison(comparison, tmp_path / "out")
    assert "| fedavg | 60.0 ± 0.0 | 36.0 ± 2.5 | +0.0 ± 0.0 | +10.0 ± 0.0 |" in table, table
    assert "others_by_skill" not in build_comparison(per_seed, reference="local")["methods"]["fedavg"]


def test_gate_curves_per_base_model_only_for_runs_that_log_gates(tmp_path: Path) -> None:
    def run(name: str, seed: int, gates: bool) -> dict:  # type: ignore[type-arg]
        run_dir = tmp_path / f"{name}-{seed}"
        run_dir.mkdir()
        rows = [{"round": r, "client": c, "train_loss": 1.0,
                 **({"beta_block_0": 0.5 + 0.1 * r, "beta_block_1": 0.3 + 0.1 * r + 0.1 * seed} if gates else {})}
                for r in (1, 2) for c in ("0", "1")]
        (run_dir / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {"seed": seed, "run_dir": str(run_dir), "overall": {k: 0.5 for k in ("self_last", "self_auc", "others_last", "unseen_last")},
                "clients": {"0": {"model_id": "m-a", "self_last": 0.5}, "1": {"model_id": "m-b", "self_last": 0.5}}}

    comparison = build_comparison({"local": [run("local", s, False) for s in (0, 1)],
                                   "fedmosaic": [run("fm", s, True) for s in (0, 1)]})
    assert "gate_beta_by_model_round" not in comparison["methods"]["local"]
    # round r: blocks 0.5 + 0.1 r and 0.3 + 0.1 r + 0.1 seed → mean 0.425 + 0.1 r over seeds 0 and 1
    assert comparison["methods"]["fedmosaic"]["gate_beta_by_model_round"] == {"m-a": pytest.approx([0.525, 0.625]),
                                                                             "m-b": pytest.approx([0.525, 0.625])}
    table = write_comparison(comparison, tmp_path / "out")
    assert "| fedmosaic | m-a | 0.53 | 0.62 |" in table and "| local | m-a |" not in table.split("Mean gate β")[1]
