"""bench/data_scarcity.py: a DRAKE-mini copy whose client tasks keep their first n train questions,
everything else and the manifest's record of it consistent; bad input leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import typer
from bench_scripts import load_bench

from drake_data.mini import build_drake_mini, load_unseen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_drake_mini(tmp_path_factory.mktemp("mini") / "drake-mini", seed=0, size="tiny")


def test_client_tasks_keep_their_first_n_train_questions(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "scarce"
    manifest = load_bench("data_scarcity").subsample_train(tiny, out, train=5)
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
        load_bench("data_scarcity").subsample_train(tiny, tmp_path / "scarce", train=13)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_replaced(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "scarce").mkdir()
    (tmp_path / "scarce" / "keep.txt").write_text("mine")
    with pytest.raises(typer.BadParameter, match="exists"):
        load_bench("data_scarcity").subsample_train(tiny, tmp_path / "scarce", train=5)
    assert (tmp_path / "scarce" / "keep.txt").read_text() == "mine"
