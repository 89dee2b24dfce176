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
from drake_data.mini.builder import GROUPS, KINDS, MEMBERS_PER_GROUP, NUM_CLIENTS, TASKS
from fedmosaic_core.models import collate_for_generation, load_model
from fedmosaic_core.models.collate import tokenize_sample
from fedmosaic_core.models.presets import NUM_IMAGE_TOKENS
from fedmosaic_flower.config import FederationConfig

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
        assert len(sc.clients) == NUM_CLIENTS and all(len(c.datasets) == 2 for c in sc.clients)
    sc = load_scenario(tiny / "scenario-homogeneous.json")
    unseen = load_unseen(tiny)
    assert len(unseen) >= 3 and not {t.key for t in unseen} & set(sc.task_owner())
    n_images: dict[str, set[int]] = {}
    for t in sc.tasks():
        for split in ("train", "test"):
            recs = load_task(tiny, t.dataset, t.subset_id, split)
            assert recs
            for rec in recs:
                s = render_sample(rec, tiny, task_type=t.type)
                n_images.setdefault(t.key, set()).add(len(s.images))
                assert all(im.size == (32, 32) and im.mode == "RGB" for im in s.images)
                assert s.choices and s.answer in s.choices
    assert {max(ns) for ns in n_images.values()} == {1, 2}
    pub = load_public(tiny)
    assert len(pub) > 20 and all(render_sample(r, tiny) for r in pub[:10])


def test_skill_groups_share_skills_on_disjoint_images(tiny: Path) -> None:
    """Each group: >= 3 clients, a same-architecture pair plus another model, every question kind
    trained by two members; members' training images are disjoint; answer formats overlap across groups."""
    sc = load_scenario(tiny / "scenario-two-families.json")
    model_of = {c.client_id: c.model_id for c in sc.clients}
    kind_of = {t.key: t.kind for t in TASKS}
    formats: dict[str, set[str]] = {}
    for g, (skill, kinds) in enumerate(GROUPS):
        members = list(range(g * MEMBERS_PER_GROUP, (g + 1) * MEMBERS_PER_GROUP))
        models = [model_of[c] for c in members]
        assert len(members) >= 3 and max(models.count(m) for m in models) >= 2 and len(set(models)) >= 2
        trained = [kind_of[r.key] for c in members for r in sc.client(c).datasets]
        assert sorted(trained) == sorted(kinds * 2)
        images: dict[int, set[str]] = {}
        for c in members:
            for ref in sc.client(c).datasets:
                for rec in load_task(tiny, ref.dataset, ref.subset_id, "train"):
                    paths = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
                    images.setdefault(c, set()).update(paths)
        for a in members:
            for b in members:
                assert a == b or not images[a] & images[b]
        formats[skill] = {KINDS[k].answer_format for k in kinds}
    skills = list(formats)
    assert all(formats[a] & formats[b] for a in skills for b in skills)


def test_no_leakage(tiny: Path) -> None:
    report = check_leakage(tiny)
    assert report.train_images > 0 and report.test_images > 0 and report.public_images > 0
    assert report.public_texts > 0  # client tasks all have images; text-only questions are public


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
def test_full_build_has_enough_questions_and_no_prompt_is_cut(tmp_path: Path) -> None:
    root = build_drake_mini(tmp_path / "full", seed=0)
    manifest = verify_build(root)
    assert manifest["total_bytes"] < 100e6
    for t in manifest["tasks"]:
        assert t["test"] >= 150 and (t["client"] is None or t["train"] >= 40)
    assert len(load_public(root)) >= 2000
    # Every task's longest prompt fits the default max-length whole, question text included.
    processor = load_model("tiny-llama-s", random_init=True).processor
    max_length = FederationConfig().max_length
    for t in TASKS:
        samples = [render_sample(r, root) for split in ("train", "test") if not (split == "train" and t.client is None)
                   for r in load_task(root, t.dataset, t.subset_id, split)]
        longest = max(samples, key=lambda s: len(s.prompt) + 1000 * len(s.images))
        batch = collate_for_generation(processor, [longest], max_length)
        text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
        assert longest.prompt.split("\n")[-1] in text
        for sample in samples:  # raises PromptTooLongError if one cannot fit
            tokenize_sample(processor, sample, max_length, with_answer=True, tokens_per_image=NUM_IMAGE_TOKENS)
