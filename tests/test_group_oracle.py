"""bench/group_oracle.py's summary on made-up comparisons: the clients without a same-model peer
in their group are paired apart from the others."""

from __future__ import annotations

import json
from pathlib import Path

from bench_scripts import load_bench
from typer.testing import CliRunner

from drake_data.layout import write_scenario


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



def _streamed_group(tmp_path: Path, self_by_method: dict[str, dict[int, dict[str, float]]]) -> Path:
    """Three clients, two tasks each; kinds: client 0 name→parity, 1 parity→big, 2 big→colour.
    ``self_by_method[method][seed][task]`` is each task's Self at the last round (round 2); round 1
    holds a decoy score that must be ignored. The runs name their scenario as ``fedmosaic`` does a
    shipped one: by name, under the data root."""
    data = tmp_path / "data"
    data.mkdir()
    tasks = {"Digits-0": "name", "Digits-1": "parity", "Digits-2": "parity", "Digits-3": "big",
             "Digits-4": "big", "Digits-5": "colour"}
    (data / "tasks.json").write_text(json.dumps([{"key": k, "kind": v} for k, v in tasks.items()]))
    write_scenario(data / "scenario-mini.json", [
        {"client_id": c, "model_id": "small", "datasets": [
            {"dataset": "Digits", "subset_id": 2 * c + i, "type": "multi-choice"} for i in range(2)]}
        for c in range(3)])
    methods = {}
    for method, per_seed in self_by_method.items():
        runs = []
        for seed, scores in per_seed.items():
            run = tmp_path / "runs" / f"{method}-seed{seed}"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"data_root": str(data), "scenario": "mini"}))
            rows = [{"client": c, "round": r, "scores": {"self": {
                f"Digits-{2 * c + i}": (scores[f"Digits-{2 * c + i}"] if r == 2 else 0.0) for i in range(2)}}}
                for r in (2, 1) for c in range(3)]
            (run / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            runs.append(str(run))
        methods[method] = {"seeds": sorted(per_seed), "runs": runs}
    folder = tmp_path / "compare"
    folder.mkdir()
    (folder / "comparison.json").write_text(json.dumps({"methods": methods}))
    return folder


def test_by_task_splits_self_by_the_place_of_a_task_in_its_stream(tmp_path: Path) -> None:
    base = {"Digits-0": 0.5, "Digits-1": 0.5, "Digits-2": 0.5, "Digits-3": 0.5, "Digits-4": 0.5, "Digits-5": 0.5}
    shared = {5: {**base, "Digits-0": 0.6, "Digits-2": 0.7, "Digits-4": 0.8,  # first tasks +10/+20/+30
                  "Digits-1": 0.6, "Digits-3": 0.6,  # later, kind trained first by a peer: +10
                  "Digits-5": 0.4},  # later, kind new to the group: −10
              6: {**base, "Digits-0": 0.6, "Digits-2": 0.7, "Digits-4": 0.8, "Digits-1": 0.8, "Digits-3": 0.8,
                  "Digits-5": 0.4}}
    folder = _streamed_group(tmp_path, {"shared": shared, "local": {5: base, 6: base}})
    result = CliRunner().invoke(load_bench("group_oracle").app, ["by-task", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("| method | the client's first task (3) | a later task whose kind another client trained before (2) "
            "| a later task whose kind no other client trained before (1) |") in lines
    assert "| local | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 |" in lines
    # first: +20 in both seeds; peer-trained: +10 then +30 (mean +20, ± 12.706 · 14.14 / √2); new: −10
    assert "| shared | +20.0 ± 0.0 | +20.0 ± 127.1 | -10.0 ± 0.0 |" in lines, result.output


def test_also_pairs_the_local_runs_of_another_comparison_as_a_method(tmp_path: Path) -> None:
    base = {"Digits-0": 0.5, "Digits-1": 0.5, "Digits-2": 0.5, "Digits-3": 0.5, "Digits-4": 0.5, "Digits-5": 0.5}
    pooled = {s: {**base, "Digits-1": 0.5 + d, "Digits-3": 0.5 + d} for s, d in ((5, 0.1), (6, 0.3))}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder = _streamed_group(tmp_path / "a", {"local": {5: base, 6: base}})
    other = _streamed_group(tmp_path / "b", {"local": pooled})
    app = load_bench("group_oracle").app
    result = CliRunner().invoke(app, ["by-task", str(folder), "--also", f"local-pooled={other}"])
    assert result.exit_code == 0, result.output
    assert "| local-pooled | +0.0 ± 0.0 | +20.0 ± 127.1 | +0.0 ± 0.0 |" in result.output.splitlines(), result.output
    for also, message in ((f"local={other}", "already compared"), (f"x={folder}", "has no 'fedavg' runs"),
                          (str(other), "expected NAME=DIR")):
        args = ["by-task", str(folder), "--also", also] + (["--reference", "fedavg"] if also.startswith("x=") else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output


def test_summary_pairs_per_base_model(tmp_path: Path) -> None:
    models = {"0": "small", "1": "small", "2": "medium"}
    local = {5: {"0": 0.5, "1": 0.6, "2": 0.7}, 6: {"0": 0.5, "1": 0.6, "2": 0.7}}
    shared = {5: {"0": 0.6, "1": 0.8, "2": 0.6}, 6: {"0": 0.6, "1": 0.8, "2": 0.6}}  # small +10/+20, medium −10
    result = CliRunner().invoke(load_bench("group_oracle").app,
                                ["summary", str(_group(tmp_path, "a", models, {"local": local, "shared": shared}))])
    assert result.exit_code == 0, result.output
    assert "| method | medium (1) | small (2) |" in result.output
    assert "| shared | -10.0 ± 0.0 / -5.0 ± 0.0 | +15.0 ± 0.0 / +7.5 ± 0.0 |" in result.output, result.output
