"""bench/drake_train_copies.py: DRAKE-mini copies whose client tasks keep their first n train
questions or add their kind peers' questions, everything else and the manifest's record of it
consistent; bad input leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import typer
from bench_scripts import load_bench
from typer.testing import CliRunner

from drake_data.mini import build_drake_mini, load_unseen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_drake_mini(tmp_path_factory.mktemp("mini") / "drake-mini", seed=0, size="tiny")


def test_client_tasks_keep_their_first_n_train_questions(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "scarce"
    manifest = load_bench("drake_train_copies").subsample_train(tiny, out, train=5)
    source = json.loads((tiny / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["subsampled_from"] == {"path": str(tiny.resolve()), "train": 5}
    client_tasks = [t for t in manifest["tasks"] if t.get("client") is not None]
    assert client_tasks and all(t["train"] == 5 for t in client_tasks)
    for task in client_tasks:
        rel = f"{task['dataset']}/train/dataset-{task['subset_id']}.json"
        full = json.loads((tiny / rel).read_text())
        kept = (out / rel).read_bytes()
        assert len(full) > 5 and json.loads(kept) == full[:5]
        assert manifest["files"][rel] == hashlib.sha256(kept).hexdigest() != source["files"][rel]
    unchanged = [rel for rel in source["files"] if "/train/" not in rel or rel.startswith("public/")]
    assert unchanged and all((out / rel).read_bytes() == (tiny / rel).read_bytes() for rel in unchanged)
    assert [t.key for t in load_unseen(out)] == [t.key for t in load_unseen(tiny)]


def test_more_questions_than_a_task_holds_is_refused_and_nothing_is_left(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(typer.BadParameter, match=r"holds 12 train questions, fewer than --train 13"):
        load_bench("drake_train_copies").subsample_train(tiny, tmp_path / "scarce", train=13)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_replaced(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "scarce").mkdir()
    (tmp_path / "scarce" / "keep.txt").write_text("mine")
    with pytest.raises(typer.BadParameter, match="exists"):
        load_bench("drake_train_copies").subsample_train(tiny, tmp_path / "scarce", train=5)
    assert (tmp_path / "scarce" / "keep.txt").read_text() == "mine"


def _train(root: Path, key: str) -> list:
    dataset, subset = key.rsplit("-", 1)
    return json.loads((root / dataset / "train" / f"dataset-{subset}.json").read_text())


def test_pooling_adds_the_kind_peers_tasks_that_start_no_later(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "pooled"
    scenario = tiny / "scenario-homogeneous.json"
    manifest = load_bench("drake_train_copies").pool_kind(tiny, out, scenario)
    peers = manifest["pooled_from"]["peers"]
    # client 0 trains digit-name then digit-parity; client 1 parity then big; client 2 big then name
    assert peers["Digits-0"] == [] and peers["Digits-1"] == ["Digits-2"] and peers["Digits-5"] == ["Digits-0"]
    assert peers["Digits-2"] == [] and all(len(v) == (k[-1] in "135") for k, v in peers.items())
    assert _train(out, "Digits-1") == _train(tiny, "Digits-1") + _train(tiny, "Digits-2")
    assert _train(out, "Digits-0") == _train(tiny, "Digits-0")
    task = {t["key"]: t for t in manifest["tasks"]}
    assert task["Digits-1"]["train"] == 24 and task["Digits-0"]["train"] == 12
    rel = "Digits/train/dataset-1.json"
    assert manifest["files"][rel] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    assert manifest["pooled_from"]["when"] == "earlier" and json.loads((out / "manifest.json").read_text()) == manifest
    assert (out / "Digits/test/dataset-1.json").read_bytes() == (tiny / "Digits/test/dataset-1.json").read_bytes()


def test_pooling_at_any_time_adds_the_later_peers_too(tiny: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        load_bench("drake_train_copies").app,
        ["pool-kind", str(tiny), str(tmp_path / "pooled"), "--scenario", str(tiny / "scenario-two-sizes.json"), "--when", "any"],
    )
    assert result.exit_code == 0, result.output
    assert "Digits-0: + Digits-5" in result.output and "EasyVQA-1: + EasyVQA-2" in result.output
    assert _train(tmp_path / "pooled", "Digits-0") == _train(tiny, "Digits-0") + _train(tiny, "Digits-5")


def test_pooling_by_a_scenario_of_other_tasks_is_refused_and_nothing_is_left(tiny: Path, tmp_path: Path) -> None:
    scenario = json.loads((tiny / "scenario-homogeneous.json").read_text())[:2]
    (tmp_path / "two.json").write_text(json.dumps(scenario))
    with pytest.raises(typer.BadParameter, match=r"two.json trains \['Digits-0', 'Digits-1', 'Digits-2', 'Digits-3'\]"):
        load_bench("drake_train_copies").pool_kind(tiny, tmp_path / "pooled", tmp_path / "two.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.json"]


def test_a_doubled_second_task_takes_the_rehearsal_of_the_first_at_a_fixed_step_budget() -> None:
    share = load_bench("drake_train_copies").first_task_share
    same, doubled, doubled_steps = (share(30, n, k, 8, 4, seed=0) for n, k in ((30, 32), (60, 32), (60, 64)))
    assert len(same) == 4 and all(0.0 <= s <= 1.0 for s in same + doubled)
    # the 60 unused samples of round 5 draw almost every batch away from the 120 used ones
    assert doubled[0] < same[0] / 3 and doubled_steps[0] > 2 * doubled[0]
    assert sum(doubled) < sum(same)
