"""DRAKE-mini: content requirements, determinism, no leakage, idempotent/atomic builds, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drake_data import DrakeDataError, load_scenario, load_task, render_sample
from drake_data.mini import (
    build_drake_mini,
    check_leakage,
    file_hashes,
    load_public,
    load_unseen,
    read_manifest,
    verify_build,
)
from drake_data.mini.__main__ import app

SCENARIOS = {
    "scenario-homogeneous.json": {"tiny-llama-s"},
    "scenario-two-sizes.json": {"tiny-llama-s", "tiny-llama-m"},
    "scenario-two-families.json": {"tiny-llama-s", "tiny-llama-m", "tiny-qwen2-s"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_drake_mini(tmp_path_factory.mktemp("mini") / "drake-mini", seed=0, size="tiny")


def test_content_requirements(tiny: Path) -> None:
    for name, models in SCENARIOS.items():
        sc = load_scenario(tiny / name, tiny)  # every task's files exist
        assert {c.model_id for c in sc.clients} == models
        assert len(sc.clients) >= 6 and all(len(c.datasets) >= 2 for c in sc.clients)
    sc = load_scenario(tiny / "scenario-homogeneous.json")
    unseen = load_unseen(tiny)
    assert len(unseen) >= 3 and not {t.key for t in unseen} & set(sc.task_owner())
    assert len(sc.tasks()) + len(unseen) >= 12
    n_images: dict[str, set[int]] = {}
    types = {t.key: t.type for t in sc.tasks()}
    for t in sc.tasks():
        for split in ("train", "test"):
            recs = load_task(tiny, t.dataset, t.subset_id, split)
            assert recs
            for rec in recs:
                s = render_sample(rec, tiny, task_type=t.type)
                n_images.setdefault(t.key, set()).add(len(s.images))
                assert all(im.size == (32, 32) and im.mode == "RGB" for im in s.images)
                assert len(s.answer.split()) <= 2
                if t.type == "multi-choice":
                    assert s.choices and s.answer in s.choices
    multi = [k for k, ns in n_images.items() if min(ns) >= 2 and max(ns) <= 4]
    assert len(multi) >= 3
    assert any(ns == {0} for ns in n_images.values())  # text-only
    assert "open-ended" in types.values()
    # skills are grouped: the digits and colours groups span two clients each
    owner = sc.task_owner()
    assert {owner[k] for k in owner if k.startswith("Digits")} == {0, 1}
    assert {owner[k] for k in owner if k.startswith("EasyVQA")} == {2, 3}
    pub = load_public(tiny)
    assert len(pub) > 20 and all(render_sample(r, tiny) for r in pub[:10])


def test_no_leakage(tiny: Path) -> None:
    report = check_leakage(tiny)
    assert report.train_images > 0 and report.test_images > 0 and report.public_images > 0
    assert report.train_texts > 0 and report.test_texts > 0 and report.public_texts > 0


def test_leakage_is_detected(tiny: Path, tmp_path: Path) -> None:
    copy = tmp_path / "leaky"
    shutil.copytree(tiny, copy)
    train = load_task(copy, "Digits", 0, "train")
    test = load_task(copy, "Digits", 0, "test")
    test[0]["image"] = train[0]["image"]  # a train image in a test question
    (copy / "Digits" / "test" / "dataset-0.json").write_text(json.dumps(test))
    with pytest.raises(DrakeDataError, match="shared by train and test"):
        check_leakage(copy)
    with pytest.raises(DrakeDataError, match="differ from manifest"):
        verify_build(copy)


def test_deterministic_and_seed_dependent(tiny: Path, tmp_path: Path) -> None:
    again = build_drake_mini(tmp_path / "again", seed=0, size="tiny")
    assert file_hashes(again) == file_hashes(tiny) == read_manifest(tiny)["files"]  # type: ignore[index]
    other = build_drake_mini(tmp_path / "other", seed=1, size="tiny")
    assert file_hashes(other) != file_hashes(tiny)
    verify_build(tiny)


def test_idempotent_atomic_and_refuses_other_builds(tiny: Path) -> None:
    before = (tiny / "manifest.json").stat().st_mtime_ns
    assert build_drake_mini(tiny, seed=0, size="tiny") == tiny  # skipped
    assert (tiny / "manifest.json").stat().st_mtime_ns == before
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(DrakeDataError, match="force"):
        build_drake_mini(tiny, seed=3, size="tiny")
    with pytest.raises(DrakeDataError, match="size must be one of"):
        build_drake_mini(tiny.parent / "x", size="huge")


def test_cli(tiny: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["build", "--out", str(tiny), "--seed", "0", "--size", "tiny"])
    assert res.exit_code == 0 and str(tiny) in res.output
    res = runner.invoke(app, ["verify", str(tiny)])
    assert res.exit_code == 0 and "ok:" in res.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("mine")
    res = runner.invoke(app, ["build", "--out", str(tmp_path / "junk"), "--size", "tiny"])
    assert res.exit_code == 2 and (tmp_path / "junk" / "file.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_build(tmp_path: Path) -> None:
    root = build_drake_mini(tmp_path / "full", seed=0)
    manifest = verify_build(root)
    assert manifest["total_bytes"] < 100e6
    for t in manifest["tasks"]:
        assert t["test"] >= 30 and (t["client"] is None or t["train"] >= 100)
    assert len(load_public(root)) >= 2000
