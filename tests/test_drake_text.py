"""DRAKE-text: the text-only benchmark for real pretrained LLMs, built from packaged data."""

from __future__ import annotations

import hashlib
from pathlib import Path

from drake_data.layout import load_scenario, load_task
from drake_data.prompts import render_sample
from drake_data.text.builder import SCENARIO, TEST, TRAIN, build_drake_text


def _digest(root: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(root.rglob("*.json")):
        sha.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return sha.hexdigest()


def test_drake_text_builds_the_same_bytes_and_a_scenario_of_two_families(tmp_path: Path) -> None:
    root = build_drake_text(tmp_path / "a", seed=0)
    assert _digest(root) == _digest(build_drake_text(tmp_path / "b", seed=0)) != _digest(build_drake_text(tmp_path / "c", seed=1))
    scenario = load_scenario(root / "scenario-real-two-families.json", root)
    assert [(c.client_id, c.model_id) for c in scenario.clients] == [(cid, model) for cid, model, _ in SCENARIO]
    texts: dict[str, set[str]] = {}
    for client in scenario.clients:
        for ref in client.datasets:
            for split, size in (("train", TRAIN), ("test", TEST)):
                records = load_task(root, ref.dataset, ref.subset_id, split)
                assert len(records) == size
                for record in records:
                    sample = render_sample(record, root, ref.type)
                    assert sample.choices is not None and len(sample.choices) == 4 and sample.answer in sample.choices
                    assert not sample.images
                texts.setdefault(f"{ref.dataset}-{ref.subset_id}", set()).update(
                    r["conversations"][0]["value"].split("\n")[1] for r in records if ref.dataset == "Dialogue")
    assert not texts["Dialogue-0"] & texts["Dialogue-2"] and not texts["Dialogue-1"] & texts["Dialogue-3"]  # disjoint halves
    from fedmosaic_cli.comparison import client_chance_and_groups

    own, _, groups = client_chance_and_groups(root, root / "scenario-real-two-families.json")
    assert groups == {"0": "arithmetic", "1": "arithmetic", "2": "chit-chat+trivia", "3": "chit-chat+trivia"}
    assert set(own.values()) == {0.25}
    public = {r["conversations"][0]["value"] for r in load_task(root, "public", 0, "train")}
    assert len(public) > 100 and not public & set().union(*texts.values())
