"""DRAKE layout, scenarios, rendering and the registry: round trips and every bad-input case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from drake_data import (
    DrakeDataError,
    load_scenario,
    load_task,
    render_sample,
    write_scenario,
    write_task,
)
from drake_data.benchmark import (
    DRAKE_SCENARIOS,
    REGISTRY_DIR,
    drake_client_map,
    drake_scenario,
    drake_tasks,
    drake_unseen_tasks,
    fetch_drake,
    resolve_drake_root,
)
from drake_data.convert_reference import canonical_sha256, convert, registry_name
from drake_data.layout import parse_scenario, task_file


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _rec(rid: str, images: list[str] | str | None, q: str, a: str) -> dict:
    rec: dict = {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if images is not None:
        rec["image"] = images
    return rec


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "dataset"
    _png(r / "Toy" / "images" / "a.png", (255, 0, 0))
    _png(r / "Toy" / "images" / "b.png", (0, 0, 255))
    return r


def test_layout_round_trip(root: Path) -> None:
    records = [
        _rec("0", "Toy/images/a.png", "<image>\nColour?\nChoice list:[red, blue]. Your answer is:", "red"),
        _rec(1, ["Toy/images/a.png", "Toy/images/b.png"], "<image><image>\nSame?\nChoice list:[Yes, No]. Your answer is:", "No"),
        {**_rec("t", None, "Say hi. Your answer is:", "hi"), "extra_field": {"kept": True}},
    ]
    path = write_task(root, "Toy", 3, "train", records)
    assert path == root / "Toy" / "train" / "dataset-3.json"
    assert load_task(root, "Toy", 3, "train") == records
    assert json.loads(path.read_text()) == records


def test_render_multi_image_and_text_only(root: Path) -> None:
    two = render_sample(_rec("x", ["Toy/images/a.png", "Toy/images/b.png"],
                             "<image><image>\nSame colour?\nChoice list:[Yes, No]. Your answer is:", " No "), root)
    assert two.prompt.count("<image>") == 2 and len(two.images) == 2
    assert two.images[0].getpixel((0, 0)) == (255, 0, 0) and two.images[1].getpixel((0, 0)) == (0, 0, 255)
    assert two.choices == ["Yes", "No"] and two.answer == "No" and two.task_type == "multi-choice"
    text = render_sample(_rec("t", None, "Name a fruit. Your answer is:", "apple"), root)
    assert text.images == [] and "<image>" not in text.prompt and text.task_type == "open-ended"
    # placeholders absent in the question: one per image is prepended
    bare = render_sample(_rec("b", ["Toy/images/a.png", "Toy/images/b.png"], "Which is red?\nChoice list:[Image 1,Image 2]", "Image 1"), root)
    assert bare.prompt.startswith("<image><image>\n") and bare.choices == ["Image 1", "Image 2"]
    # inline placeholders (Bongard style) are kept where they are
    inline = render_sample(_rec("i", ["Toy/images/a.png", "Toy/images/b.png"],
                                "Positive: <image>\nQuery: <image>\nChoice list:[Positive, Negative]. Your answer is:", "Positive"), root)
    assert inline.prompt.startswith("Positive: <image>\nQuery: <image>")
    assert render_sample(_rec("o", "Toy/images/a.png", "<image>\nWhat?", "x"), root, task_type="multi-choice").task_type == "multi-choice"


def test_published_relative_image_paths_resolve(root: Path) -> None:
    # published DRAKE writes "dataset/<Dataset>/..." relative to the root's parent
    s = render_sample(_rec("p", ["dataset/Toy/images/b.png"], "<image>\nQ?", "a"), root)
    assert s.images[0].getpixel((0, 0)) == (0, 0, 255)


# ------------------------------------------------------------------------------ bad input
def test_malformed_record_names_file_and_record(root: Path) -> None:
    path = task_file(root, "Toy", 0, "train")
    path.parent.mkdir(parents=True)
    good = _rec("ok", "Toy/images/a.png", "<image>\nQ", "A")
    for bad, needle in [
        ({"id": "nope", "image": "Toy/images/a.png"}, "conversations"),
        ({**good, "id": "two-q", "conversations": good["conversations"] * 2}, "exactly [human, gpt]"),
        ({**good, "id": "wrong-speaker", "conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}, "human"),
        ({**good, "id": None}, "id"),
    ]:
        path.write_text(json.dumps([good, bad]))
        with pytest.raises(DrakeDataError) as err:
            load_task(root, "Toy", 0, "train")
        msg = str(err.value)
        assert str(path) in msg and "record #1" in msg and needle in msg
    path.write_text("{not json")
    with pytest.raises(DrakeDataError, match="not valid JSON"):
        load_task(root, "Toy", 0, "train")
    path.write_text(json.dumps([good, good]))
    with pytest.raises(DrakeDataError, match=r"record #1 \(id='ok'\): duplicate id"):
        load_task(root, "Toy", 0, "train")


def test_missing_image_names_file_and_record(root: Path) -> None:
    write_task(root, "Toy", 1, "test", [_rec("m1", ["Toy/images/a.png", "Toy/images/gone.png"], "<image><image>\nQ", "A")])
    with pytest.raises(DrakeDataError) as err:
        load_task(root, "Toy", 1, "test")
    assert "dataset-1.json" in str(err.value) and "m1" in str(err.value) and "gone.png" in str(err.value)
    with pytest.raises(DrakeDataError, match="m1.*gone.png"):
        render_sample(load_task(root, "Toy", 1, "test", check_images=False)[0], root)


def test_placeholder_mismatch_is_an_error(root: Path) -> None:
    with pytest.raises(DrakeDataError, match="2 <image> placeholders but the record lists 1"):
        render_sample(_rec("pm", "Toy/images/a.png", "<image><image>\nQ", "A"), root)


def test_missing_task_file_lists_what_exists(root: Path) -> None:
    write_task(root, "Toy", 0, "train", [_rec("a", None, "Q", "A")])
    with pytest.raises(DrakeDataError, match=r"dataset-7.json.*subsets present for Toy/train: \[0\]"):
        load_task(root, "Toy", 7, "train")


def _scenario(clients: list[tuple[int, list[tuple[str, int]]]]) -> list[dict]:
    return [{"client_id": c, "model_id": "m", "datasets": [{"dataset": d, "subset_id": s, "type": "multi-choice"} for d, s in ts]}
            for c, ts in clients]


def test_scenario_round_trip_and_errors(root: Path, tmp_path: Path) -> None:
    for split in ("train", "test"):
        for sid in (0, 1):
            write_task(root, "Toy", sid, split, [_rec(f"{sid}", None, "Q", "A")])
    path = tmp_path / "sc.json"
    data = _scenario([(0, [("Toy", 0)]), (1, [("Toy", 1)])])
    data[0]["datasets"][0]["metric"] = "F1"  # the published files carry this optional key
    write_scenario(path, data)
    sc = load_scenario(path, root)
    assert sc.task_owner() == {"Toy-0": 0, "Toy-1": 1} and sc.to_json() == data

    path.write_text(json.dumps(_scenario([(0, [("Toy", 0)]), (1, [("Toy", 0)])])))
    with pytest.raises(DrakeDataError, match=r"sc.json, record #1 \(client_id=1\): task Toy-0 is already assigned to client_id 0"):
        load_scenario(path)
    path.write_text(json.dumps(_scenario([(0, [("Toy", 0)]), (1, [("Nope", 0)])])))
    with pytest.raises(DrakeDataError, match=r"record #1 \(client_id=1\), datasets\[0\]: Nope-0 .*unknown dataset 'Nope'"):
        load_scenario(path, root)
    path.write_text(json.dumps(_scenario([(0, [("Toy", 0)]), (1, [("Toy", 5)])])))
    with pytest.raises(DrakeDataError, match=r"Toy-5 has no train file .*known subsets: \[0, 1\]"):
        load_scenario(path, root)
    bad = _scenario([(0, [("Toy", 0)])])
    bad[0]["datasets"][0]["type"] = "essay"
    path.write_text(json.dumps(bad))
    with pytest.raises(DrakeDataError, match=r"record #0 \(client_id=0\): malformed entry: datasets.0.type"):
        load_scenario(path)


# ------------------------------------------------------------------------------- registry
def test_drake_registry() -> None:
    tasks = drake_tasks()
    assert len(tasks) == 40 and len({(t["dataset"], t["subset_id"]) for t in tasks}) == 40
    assert all(t["subset_id"] < 10 for t in tasks)  # the authors' ids (dataset-<id>.json), not 40+
    cmap = drake_client_map()
    assert sorted(cmap) == list(range(10)) and all(len(v) == 4 for v in cmap.values())
    assert cmap[0] == ["Fashion200K-0", "MagicBrush-0", "VISION-0", "FashionIQ-0"]
    assert len(drake_unseen_tasks()) == 7
    assert {"homo-llama-1B", "hetero-llama-1B-3B", "hetero-llama-1B-3B-8B", "hetero-qwen-0.5B-1.5B-3B"} <= set(DRAKE_SCENARIOS)
    listed = {(t["dataset"], t["subset_id"]) for t in tasks}
    for name in DRAKE_SCENARIOS:
        sc = drake_scenario(name)
        assert len(sc.clients) == 10 and {(t.dataset, t.subset_id) for t in sc.tasks()} == listed
    assert {c.model_id for c in drake_scenario("homo-llama-1B").clients} == {"thkim0305/llama3.2_1B_vl"}
    assert {c.model_id for c in drake_scenario("hetero-llama-1B-3B").clients} == {
        "thkim0305/llama3.2_1B_vl", "thkim0305/llama3.2_3B_vl"}


def test_registry_equals_the_published_files_key_for_key(tmp_path: Path) -> None:
    """Each registry file is the published file (hash of its canonical JSON, recorded with the
    source commit), and the loader reads each scenario back key for key."""
    provenance = json.loads((REGISTRY_DIR / "provenance.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]) and "snumprlab/fedmosaic" in provenance["source"]
    on_disk = {p.name for p in REGISTRY_DIR.glob("*.json")} - {"provenance.json"}
    assert on_disk == set(provenance["files"]) and len(on_disk) >= 15
    for name, entry in provenance["files"].items():
        data = json.loads((REGISTRY_DIR / name).read_text())
        assert canonical_sha256(data) == entry["sha256"], name
        assert registry_name(Path(entry["source"]).name) == name
        if name != "task-list.json":
            assert parse_scenario(data, name).to_json() == data, name
    # the converter reproduces the registry from a checkout's files
    checkout = tmp_path / "checkout" / "scenarios"
    checkout.mkdir(parents=True)
    for name, entry in provenance["files"].items():
        (checkout / Path(entry["source"]).name).write_text((REGISTRY_DIR / name).read_text())
    again = convert(checkout.parent, provenance["commit"], tmp_path / "out")
    assert again == provenance
    with pytest.raises(DrakeDataError, match="no scenarios/DRAKE_"):
        convert(tmp_path, "x", tmp_path / "none")


def test_missing_drake_root_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRAKE_ROOT", raising=False)
    with pytest.raises(DrakeDataError, match=r"(?s)huggingface-cli download SNUMPR/DRAKE.*--drake-root"):
        resolve_drake_root(None)
    with pytest.raises(DrakeDataError, match="does not exist"):
        resolve_drake_root(tmp_path / "nowhere")
    assert resolve_drake_root(tmp_path) == tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DrakeDataError, match="HF_HUB_OFFLINE"):
        fetch_drake(tmp_path / "dl")
