"""bench/group_oracle.py's summary on made-up comparisons: the clients without a same-model peer
in their group are paired apart from the others."""

from __future__ import annotations

import json
from pathlib import Path

from bench_scripts import load_bench
from typer.testing import CliRunner


def _group(tmp_path: Path, name: str, models: dict[str, str], self_last: dict[str, dict[int, dict[str, float]]]) -> Path:
    """A comparison folder of one group; ``self_last[method][seed][client]``, Others = Self / 2."""
    methods = {}
    for method, per_seed in self_last.items():
        runs = []
        for seed, clients in per_seed.items():
            run = tmp_path / "runs" / f"{name}-{method}-seed{seed}"
            (run / "report").mkdir(parents=True)
            rows = {c: {"model_id": models[c], "self_last": v, "others_last": v / 2} for c, v in clients.items()}
            (run / "report" / "summary.json").write_text(json.dumps({"clients": rows}))
            runs.append(str(run))
        seeds = sorted(per_seed)
        mean = {metric: [sum(per_seed[s].values()) / len(per_seed[s]) * scale for s in seeds]
                for metric, scale in (("self_last", 1.0), ("self_auc", 1.0), ("others_last", 0.5))}
        methods[method] = {"seeds": seeds, "runs": runs, "clients": {c: {"model_id": m} for c, m in models.items()},
                           **{k: {"per_seed": v} for k, v in mean.items()}}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "comparison.json").write_text(json.dumps({"methods": methods}))
    return folder


def test_the_client_without_a_same_model_peer_is_paired_apart(tmp_path: Path) -> None:
    models = {"0": "small", "1": "small", "2": "medium"}
    local = {5: {"0": 0.5, "1": 0.6, "2": 0.7}, 6: {"0": 0.5, "1": 0.6, "2": 0.7}}
    shared = {5: {"0": 0.6, "1": 0.7, "2": 0.6}, 6: {"0": 0.7, "1": 0.8, "2": 0.6}}  # pair +10/+20, lone −10
    pair_only = _group(tmp_path, "b", {"3": "small", "4": "small"},
                       {"local": {5: {"3": 0.5, "4": 0.5}, 6: {"3": 0.5, "4": 0.5}},
                        "shared": {5: {"3": 0.6, "4": 0.6}, 6: {"3": 0.7, "4": 0.7}}})
    result = CliRunner().invoke(load_bench("group_oracle").app, ["summary", str(_group(tmp_path, "a", models,
                                                                       {"local": local, "shared": shared})),
                                                str(pair_only)])
    assert result.exit_code == 0, result.output
    split = result.output.split("without one")[-1]
    assert "1 client(s) without" in result.output
    # with a peer: seed 5 mean(+10, +10, +10, +10) = +10, seed 6 mean(+20, +20, +20, +20) = +20;
    # without: −10 in both seeds (interval 0); Others are half of Self
    assert "| shared | +15.0 ± 63.5 / +7.5 ± 31.8 | -10.0 ± 0.0 / -5.0 ± 0.0 |" in split, split


def test_groups_in_which_every_client_has_a_same_model_peer_show_no_empty_side(tmp_path: Path) -> None:
    models = {"0": "small", "1": "small"}
    group = _group(tmp_path, "a", models, {"local": {5: {"0": 0.5, "1": 0.6}, 6: {"0": 0.5, "1": 0.6}},
                                           "shared": {5: {"0": 0.6, "1": 0.6}, 6: {"0": 0.6, "1": 0.8}}})
    result = CliRunner().invoke(load_bench("group_oracle").app, ["summary", str(group)])
    assert result.exit_code == 0, result.output
    split = result.output.split("without one")[-1]
    assert "nan" not in result.output
    assert "| shared | +10.0 ± 63.5 / +5.0 ± 31.8 | — (no client) |" in split, split
