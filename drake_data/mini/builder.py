"""DRAKE-mini: a small benchmark in DRAKE's layout and scenario format, built offline from real
data shipped in packages (see ``sources.py``).

No leakage by construction: every source image (after removing pixel-identical repeats) is put
in exactly one pool — *public*, *train* or *test* — and a question of a split only uses images
of that split's pool (unseen tasks use the test pool). Text lines are split the same way.
:func:`check_leakage` verifies it on the written files by pixel hash and by text.

Idempotent and atomic: the build happens in a temp folder next to ``out`` that is renamed to
``out`` once complete; ``manifest.json`` (written last) records version, seed, size and the
SHA-256 of every data file; a complete build with the same version/seed/size is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import drake_data.mini.sources as S
from drake_data.errors import DrakeDataError
from drake_data.layout import (
    IMAGE_TOKEN,
    TaskRef,
    dump_json,
    load_scenario,
    load_task,
    load_task_refs,
    parse_scenario,
    write_task,
)
from fedmosaic_core.storage import atomic_write_text

log = logging.getLogger(__name__)

MINI_VERSION = "3"
FORMAT = "drake-mini"
SIZES: dict[str, dict[str, int]] = {
    # per client task: train and test questions; public images per source, public chat pairs
    "default": {"train": 120, "test": 200, "public_images": 1000, "public_chat": 600},
    "tiny": {"train": 12, "test": 6, "public_images": 12, "public_chat": 12},
}
POOL_FRACTIONS = {  # (public, test) fractions; the rest is train. EasyVQA: its own test split.
    "Digits": (0.25, 0.2), "AnimalShapes": (0.2, 0.2), "Faces": (0.2, 0.25), "EasyVQA": (0.25, 0.0),
}
MAX_TOPIC_WORDS = 20
MAX_CHAT_ANSWER_WORDS = 12
MODELS = ("tiny-llama-s", "tiny-llama-m", "tiny-qwen2-s")
YES_NO = ["Yes", "No"]
WILD_ANIMALS = ("bear", "elephant", "giraffe", "zebra")
FARM_ANIMALS = ("cow", "horse", "sheep")
WARM_COLOURS = ("red", "yellow", "brown")
EXCLUDE_FROM_HASH = ("manifest.json", "README.md")


# ------------------------------------------------------------------------------ task specs
@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: which source it draws on, its skill group and its answer format."""

    dataset: str
    skill: str
    answer_format: str
    images_per_question: str
    description: str


KINDS: dict[str, QuestionKind] = {
    "digit-name": QuestionKind("Digits", "digits", "digit", "1", "name the digit (4 options)"),
    "digit-parity": QuestionKind("Digits", "digits", "yes/no", "1", "is the digit even?"),
    "digit-big": QuestionKind("Digits", "digits", "yes/no", "1", "is the digit greater than 4?"),
    "colour-name": QuestionKind("EasyVQA", "colours", "colour", "1", "name the shape's colour (4 options)"),
    "colour-same": QuestionKind("EasyVQA", "colours", "yes/no", "2", "do the two shapes have the same colour?"),
    "colour-warm": QuestionKind("EasyVQA", "colours", "yes/no", "1", "is the colour warm? (red, yellow, brown)"),
    "animal-name": QuestionKind("AnimalShapes", "animals", "animal", "1", "name the animal silhouette (4 options)"),
    "animal-farm": QuestionKind("AnimalShapes", "animals", "yes/no", "1",
                                "is it a farm animal? (cow, horse, sheep; birds left out)"),
    "animal-wild": QuestionKind("AnimalShapes", "animals", "yes/no", "1",
                                "is it a wild animal? (bear, elephant, giraffe, zebra; birds left out)"),
    # unseen kinds (test split only)
    "digit-same": QuestionKind("Digits", "digits", "yes/no", "2", "do the two images show the same digit?"),
    "digit-which": QuestionKind("Digits", "digits", "image k", "3", "which of three images shows the digit d?"),
    "shape-name": QuestionKind("EasyVQA", "shapes", "shape", "1", "name the shape (3 options)"),
}
#: Skill groups: each group's members train on two of its three question kinds (member k: kinds
#: k and k+1, so every kind is trained by two members at different times), each member on its own
#: slice of the group's training images. Every group also answers yes/no besides its own
#: vocabulary, so each group's answer format overlaps the others' while its skill differs.
#: Measured on the tiny presets (BENCHMARKS.md, "DRAKE-mini v3"): kinds that relate the question
#: text to the image ("which of three images shows ...?", "is this a <animal>?", "is the shape
#: <colour>?") stayed at chance for every client with 128 local steps, so client tasks are skills
#: that map what the base sees to an answer; the relational kinds are unseen tasks only.
GROUPS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("digits", ("digit-name", "digit-parity", "digit-big")),
    ("colours", ("colour-name", "colour-same", "colour-warm")),
    ("animals", ("animal-name", "animal-wild", "animal-farm")),
)
MEMBERS_PER_GROUP = 3
UNSEEN_KINDS = ("digit-same", "digit-which", "shape-name")
NUM_CLIENTS = len(GROUPS) * MEMBERS_PER_GROUP
#: Model of each member, per group, in the default (three-model) scenario: every group has a
#: same-architecture pair plus a client of another size or family.
GROUP_MODELS = (
    ("tiny-llama-s", "tiny-llama-s", "tiny-llama-m"),
    ("tiny-qwen2-s", "tiny-qwen2-s", "tiny-llama-s"),
    ("tiny-llama-m", "tiny-llama-m", "tiny-qwen2-s"),
)


@dataclass(frozen=True)
class TaskSpec:
    dataset: str
    subset_id: int
    kind: str
    client: int | None  # None: unseen (test only)
    slot: int = 0  # which slice of the source's training images the client's questions use

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.subset_id}"

    @property
    def info(self) -> QuestionKind:
        return KINDS[self.kind]

    def ref(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "subset_id": self.subset_id, "type": "multi-choice"}


def _task_specs() -> tuple[TaskSpec, ...]:
    """Client tasks in client order (two each, in stream order), then the unseen ones."""
    next_subset: dict[str, int] = {}
    specs: list[TaskSpec] = []

    def new(kind: str, client: int | None, slot: int = 0) -> None:
        dataset = KINDS[kind].dataset
        subset = next_subset.get(dataset, 0)
        next_subset[dataset] = subset + 1
        specs.append(TaskSpec(dataset, subset, kind, client, slot))

    for g, (_skill, kinds) in enumerate(GROUPS):
        for member in range(MEMBERS_PER_GROUP):
            for step in range(2):
                new(kinds[(member + step) % len(kinds)], g * MEMBERS_PER_GROUP + member, member)
    for kind in UNSEEN_KINDS:
        new(kind, None)
    return tuple(specs)


TASKS: tuple[TaskSpec, ...] = _task_specs()


def mc_prompt(n_images: int, question: str, choices: Sequence[str]) -> str:
    """DRAKE's multiple-choice prompt style (as in its VSR / IRFL / Bongard files)."""
    head = IMAGE_TOKEN * n_images + "\n" if n_images else ""
    return f"{head}{question}\nChoice list:[{', '.join(choices)}]. Your answer is:"


def drake_record(rid: str, images: list[str], question: str, answer: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": rid}
    if images:
        rec["image"] = images[0] if len(images) == 1 else images
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return rec


# ------------------------------------------------------------------------------ the build
class _Build:
    """State of one build: sources, pools, the images referenced so far."""

    def __init__(self, seed: int, size: str) -> None:
        self.seed = seed
        self.cfg = SIZES[size]
        self.size = size
        self.sources: dict[str, S.ImageSource] = {
            "Digits": S.load_digits_source(),
            "EasyVQA": S.load_easy_vqa_source(),
            "AnimalShapes": S.load_animal_source(),
            "Faces": S.load_faces_source(),
        }
        self.pools: dict[str, dict[str, np.ndarray]] = {n: self._partition(n, k) for k, n in enumerate(self.sources)}
        self.used: dict[str, tuple[str, int]] = {}  # relpath -> (source, index)
        self.skipped: dict[str, int] = {f"{n}_duplicate_images": s.duplicates_removed for n, s in self.sources.items()}
        self.skipped["EasyVQA_images_without_colour_or_shape"] = int(self.sources["EasyVQA"].extra["unlabeled_skipped"])
        self.chat: dict[str, list[list[str]]] = S.load_chat_corpus()

    def rng(self, *key: int | str) -> np.random.Generator:
        """A generator for one purpose, independent of the order things are built in."""
        digest = hashlib.sha256(json.dumps([self.seed, *key]).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def _partition(self, name: str, k: int) -> dict[str, np.ndarray]:
        src = self.sources[name]
        f_public, f_test = POOL_FRACTIONS[name]
        rng = self.rng("pool", name)
        if src.native_test is not None:
            test = np.flatnonzero(src.native_test)
            rest = rng.permutation(np.flatnonzero(~src.native_test))
            n_pub = int(round(f_public * len(rest)))
            return {"public": np.sort(rest[:n_pub]), "train": np.sort(rest[n_pub:]), "test": np.sort(test)}
        order = rng.permutation(len(src.images))
        n_pub, n_test = int(round(f_public * len(order))), int(round(f_test * len(order)))
        return {"public": np.sort(order[:n_pub]), "test": np.sort(order[n_pub:n_pub + n_test]),
                "train": np.sort(order[n_pub + n_test:])}

    def image(self, source: str, index: int) -> str:
        rel = f"{source}/images/{int(index):05d}.png"
        self.used[rel] = (source, int(index))
        return rel

    def attr(self, source: str, index: int) -> dict[str, Any]:
        return self.sources[source].attrs[int(index)]

    def pool(self, source: str, split: str, slot: int = 0) -> np.ndarray:
        """A split's images; the train split is cut into one disjoint slice per group member."""
        pool = self.pools[source][split]
        if split != "train":
            return pool
        order = self.rng("slices", source).permutation(pool)
        return np.sort(np.array_split(order, MEMBERS_PER_GROUP)[slot])

    def by_label(self, source: str, split: str, key: str, slot: int = 0) -> dict[Any, np.ndarray]:
        pool = self.pool(source, split, slot)
        labels = np.asarray([self.attr(source, i)[key] for i in pool], dtype=object)
        return {lab: pool[labels == lab] for lab in sorted(set(labels.tolist()))}


def _distinct(rng: np.random.Generator, n: int, make: Callable[[int], dict[str, Any]], key: Callable[[dict[str, Any]], str],
              limit: int) -> list[dict[str, Any]]:
    """``n`` records whose ``key`` differ (retrying duplicates, at most ``limit`` tries)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < limit:
        rec = make(len(out))
        tries += 1
        k = key(rec)
        if k not in seen:
            seen.add(k)
            out.append(rec)
    if len(out) < n:
        raise DrakeDataError(f"could only make {len(out)} of {n} distinct questions")
    return out


def _key(rec: dict[str, Any]) -> str:
    return json.dumps([rec.get("image"), rec["conversations"][0]["value"]])


def _balanced(rng: np.random.Generator, n: int, options: Sequence[Any]) -> list[Any]:
    """``n`` targets cycling through ``options`` (as even as possible), shuffled."""
    targets = [options[i % len(options)] for i in range(n)]
    return [targets[i] for i in rng.permutation(n)]


def _make_task(b: _Build, spec: TaskSpec, split: str, n: int) -> list[dict[str, Any]]:
    """``n`` distinct questions of ``spec``'s kind on ``split``'s images (balanced answers)."""
    rng = b.rng("task", spec.key, split)
    prefix = f"{spec.key}-{split}"
    rid = lambda i: f"{prefix}-{i:05d}"  # noqa: E731
    kind, source = spec.kind, spec.dataset
    label = {"Digits": "digit", "EasyVQA": "color", "AnimalShapes": "animal"}[source]
    if kind == "shape-name":
        label = "shape"
    by = b.by_label(source, split, label, spec.slot)
    values = sorted(by)
    pick = lambda v: int(rng.choice(by[v]))  # noqa: E731
    image = lambda v: b.image(source, pick(v))  # noqa: E731
    images_k = [f"Image {j + 1}" for j in range(3)]  # unseen "which image" kinds
    name_question = {"digit-name": "What digit is written in the image?", "colour-name": "What color is the shape?",
                     "animal-name": "Which animal is shown in the silhouette?", "shape-name": "What shape is in the image?"}
    same_question = {"digit-same": "Do the two images show the same digit?",
                     "colour-same": "Do these two shapes have the same color?"}
    which_question = {"digit-which": "Which image shows the digit {}?"}

    if kind in name_question:
        targets = _balanced(rng, n, values)
        n_options = min(4, len(values))

        def make(i: int) -> dict[str, Any]:
            v = targets[i]
            others = [x for x in rng.permutation([x for x in values if x != v])[: n_options - 1]]
            choices = [str(x) for x in rng.permutation([v, *others])]
            return drake_record(rid(i), [image(v)], mc_prompt(1, name_question[kind], choices), str(v))
    elif kind in same_question:
        targets = _balanced(rng, n, YES_NO)

        def make(i: int) -> dict[str, Any]:
            if targets[i] == "Yes":
                v = values[int(rng.integers(len(values)))]
                x, y = (int(t) for t in rng.choice(by[v], 2, replace=False))
                imgs = [b.image(source, x), b.image(source, y)]
            else:
                v1, v2 = (values[int(t)] for t in rng.choice(len(values), 2, replace=False))
                imgs = [image(v1), image(v2)]
            return drake_record(rid(i), imgs, mc_prompt(2, same_question[kind], YES_NO), targets[i])
    elif kind in which_question:
        targets = _balanced(rng, n, [1, 2, 3])

        def make(i: int) -> dict[str, Any]:
            shown = [values[int(t)] for t in rng.choice(len(values), 3, replace=False)]
            target = shown[targets[i] - 1]
            imgs = [image(v) for v in shown]
            return drake_record(rid(i), imgs, mc_prompt(3, which_question[kind].format(target), images_k), f"Image {targets[i]}")
    elif kind in ("digit-parity", "digit-big", "colour-warm", "animal-wild", "animal-farm"):
        question, holds = {
            "digit-parity": ("Is the digit in the image even?", lambda v: int(v) % 2 == 0),
            "digit-big": ("Is the digit in the image greater than 4?", lambda v: int(v) > 4),
            "colour-warm": ("Is the shape a warm color?", lambda v: v in WARM_COLOURS),
            "animal-wild": ("Is this a wild animal?", lambda v: v in WILD_ANIMALS),
            "animal-farm": ("Is this a farm animal?", lambda v: v in FARM_ANIMALS),
        }[kind]
        eligible = [v for v in values if not (kind.startswith("animal") and v == "bird")]
        targets = _balanced(rng, n, YES_NO)

        def make(i: int) -> dict[str, Any]:
            want = targets[i] == "Yes"
            v = [x for x in eligible if holds(x) == want][int(rng.integers(len([x for x in eligible if holds(x) == want])))]
            return drake_record(rid(i), [image(v)], mc_prompt(1, question, YES_NO), targets[i])
    else:
        raise AssertionError(kind)
    return _distinct(rng, n, make, _key, limit=50 * n + 100)


# Public captions name every visual attribute the client tasks ask about (digit value, colour,
# shape, animal), so the bases can see them; the clients' tasks then test question skills on top
# (parity, comparison, which-image, same/different) that adapters must learn and can share.
_CAPTION = {
    "Digits": lambda a: f"a handwritten {a['digit']}",
    "EasyVQA": lambda a: f"a {a['color']} {a['shape']}",
    "AnimalShapes": lambda a: f"a {a['animal']} silhouette",
    "Faces": lambda a: "a human face" if a["face"] else "a background patch",
}
_KIND = {"Digits": "a digit", "EasyVQA": "a shape", "AnimalShapes": "an animal", "Faces": "a photo"}


def _public(b: _Build) -> dict[str, list[dict[str, Any]]]:
    """Captions ("What is in the image?"), a picture-kind multiple choice on a third of the images,
    and short chat Q/A pairs. Disjoint pools only."""
    recs: list[dict[str, Any]] = []
    cap = b.cfg["public_images"]
    for source in b.sources:
        pool = b.pools[source]["public"]
        rng = b.rng("public", source)
        chosen = np.sort(rng.permutation(pool)[:cap])
        for img in chosen:
            attrs = b.attr(source, img)
            path = b.image(source, int(img))
            recs.append(drake_record("", [path], IMAGE_TOKEN + "\nWhat is in the image? Your answer is:", _CAPTION[source](attrs)))
            if rng.random() < 1 / 3:
                choices = [str(x) for x in rng.permutation(list(_KIND.values()))]
                recs.append(drake_record("", [path], mc_prompt(1, "What kind of picture is this?", choices), _KIND[source]))
    # Answer-format drill: text-only "pick the named option" questions over the client tasks'
    # answer words. They teach the output vocabulary and the choice format, not a visual skill
    # (no image, and the question names the answer).
    vocab = [str(d) for d in range(10)] + list(S.COLORS) + list(S.ANIMALS) + ["Yes", "No", "circle", "rectangle", "triangle"]
    rng = b.rng("public", "drill")
    for _ in range(b.cfg["public_chat"]):
        answer = str(rng.choice(vocab))
        others = [str(x) for x in rng.choice([v for v in vocab if v != answer], 3, replace=False)]
        choices = [str(x) for x in rng.permutation([answer, *others])]
        recs.append(drake_record("", [], mc_prompt(0, f"Choose the option '{answer}'.", choices), answer))
    pairs: list[tuple[str, str]] = []
    for cat in sorted(b.chat):
        for conv in b.chat[cat]:
            for q, a in zip(conv, conv[1:], strict=False):
                if 1 <= len(a.split()) <= MAX_CHAT_ANSWER_WORDS and len(q.split()) <= MAX_TOPIC_WORDS:
                    pairs.append((q, a))
    pairs = sorted(set(pairs))
    rng = b.rng("public", "chat")
    for j in rng.permutation(len(pairs))[: b.cfg["public_chat"]]:
        q, a = pairs[j]
        recs.append(drake_record("", [], f"{q} Your answer is:", a))
    order = b.rng("public", "order").permutation(len(recs))
    recs = [recs[j] for j in order]
    n_test = max(1, len(recs) // 20)
    split = {"test": recs[:n_test], "train": recs[n_test:]}
    for name, lst in split.items():
        for i, r in enumerate(lst):
            r["id"] = f"public-{name}-{i:05d}"
    return split


# ---------------------------------------------------------------------------- scenarios
def _scenarios() -> dict[str, list[dict[str, Any]]]:
    def entries(model_of: Callable[[int, int], str]) -> list[dict[str, Any]]:
        return [{"client_id": c, "model_id": model_of(c // MEMBERS_PER_GROUP, c % MEMBERS_PER_GROUP),
                 "datasets": [t.ref() for t in TASKS if t.client == c]} for c in range(NUM_CLIENTS)]

    return {
        "scenario-homogeneous.json": entries(lambda g, m: MODELS[0]),
        "scenario-two-sizes.json": entries(lambda g, m: MODELS[0] if m < 2 else MODELS[1]),
        "scenario-two-families.json": entries(lambda g, m: GROUP_MODELS[g][m]),
    }


# ------------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every data file under ``root`` (``manifest.json`` and ``README.md`` excluded)."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in EXCLUDE_FROM_HASH}


def read_manifest(root: Path | str) -> dict[str, Any] | None:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _readme(manifest: dict[str, Any], seconds: float, total_bytes: int) -> str:
    lines = [
        "# DRAKE-mini",
        "",
        "A small benchmark in the on-disk layout and scenario format of DRAKE (`SNUMPR/DRAKE`), built "
        "offline by `python -m drake_data.mini build` from real data shipped in Python packages.",
        "",
        f"- version {manifest['version']}, seed {manifest['seed']}, size `{manifest['size']}`",
        f"- build time: {seconds:.1f} s; total size on disk: {total_bytes / 1e6:.2f} MB "
        f"({manifest['counts']['files']} files, {manifest['counts']['images']} PNG images of 32×32 RGB)",
        "- deterministic: every file except this README (build time) has the SHA-256 listed in `manifest.json`.",
        "",
        "## Tasks",
        "",
        "| task | client | skill group | answer format | images / question | train | test | what |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in manifest["tasks"]:
        client = "unseen" if t["client"] is None else str(t["client"])
        lines.append(f"| {t['key']} | {client} | {t['skill']} | {t['answer_format']} | {t['images_per_question']} | "
                     f"{t['train']} | {t['test']} | {t['description']} |")
    pub = manifest["counts"]["public"]
    lines += [
        "",
        f"Skill groups of {MEMBERS_PER_GROUP} clients (digits: 0-2, colours: 3-5, animals: 6-8). Member k of a "
        "group trains on the group's question kinds k and k+1 (in that order: a dynamic stream), each member "
        "on its own slice of the group's training images; every group also answers yes/no and 'Image k', so "
        "answer formats overlap across groups while skills differ. Unseen tasks (test split only) are listed "
        "in `unseen.json`.",
        "",
        f"Public split (`public/{{train,test}}/dataset-0.json`, `drake_data.mini.load_public`): {pub['train']} train / "
        f"{pub['test']} test records — captions, a picture-kind choice, short chat Q/A — built from images and "
        "text lines that no task uses.",
        "",
        "No leakage: each source image (after dropping pixel-identical repeats) lies in exactly one pool "
        "(public / train / test); train questions use train-pool images only, test and unseen questions "
        "test-pool images only. `python -m drake_data.mini verify DIR` re-checks it on the files.",
        "",
        "Scenarios: `scenario-homogeneous.json` (all `tiny-llama-s`), `scenario-two-sizes.json` "
        "(per group two `tiny-llama-s` and one `tiny-llama-m`), `scenario-two-families.json` (per group a "
        "same-architecture pair plus another size or family: " + "; ".join("/".join(m) for m in GROUP_MODELS) + ").",
        "",
        "## Sources and licences",
        "",
        "| package | version | data | licence |",
        "|---|---|---|---|",
    ]
    for dist, (what, licence) in S.SOURCE_LICENCES.items():
        lines.append(f"| {dist} | {manifest['package_versions'].get(dist, '?')} | {what} | {licence} |")
    lines += ["", "Skipped while building (logged, never silent):", ""]
    lines += [f"- {k}: {v}" for k, v in manifest["skipped"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- building
def _write_all(tmp: Path, seed: int, size: str) -> dict[str, Any]:
    b = _Build(seed, size)
    task_meta = []
    for spec in TASKS:
        counts: dict[str, int] = {}
        for split in ("train", "test"):
            if split == "train" and spec.client is None:
                continue
            recs = _make_task(b, spec, split, b.cfg[split])
            write_task(tmp, spec.dataset, spec.subset_id, split, recs)
            counts[split] = len(recs)
        info = spec.info
        task_meta.append({"key": spec.key, **spec.ref(), "kind": spec.kind, "client": spec.client,
                          "skill": info.skill, "answer_format": info.answer_format,
                          "images_per_question": info.images_per_question, "description": info.description,
                          "train": counts.get("train", 0), "test": counts["test"]})
    public = _public(b)
    for split, recs in public.items():
        write_task(tmp, "public", 0, split, recs)
    for rel in sorted(b.used):
        source, index = b.used[rel]
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(b.sources[source].images[index]).save(path, format="PNG")
    for name, entries in _scenarios().items():
        atomic_write_text(tmp / name, dump_json(parse_scenario(entries, name).to_json()))
    unseen = [TaskRef.model_validate(t.ref()).model_dump(exclude_none=True) for t in TASKS if t.client is None]
    atomic_write_text(tmp / "unseen.json", dump_json(unseen))
    atomic_write_text(tmp / "tasks.json", dump_json(task_meta))
    return {
        "format": FORMAT, "version": MINI_VERSION, "seed": seed, "size": size,
        "tasks": task_meta,
        "counts": {"images": len(b.used), "public": {k: len(v) for k, v in public.items()}},
        "skipped": b.skipped, "package_versions": S.package_versions(),
    }


def build_drake_mini(out: Path | str, seed: int = 0, size: str = "default", force: bool = False) -> Path:
    """Build DRAKE-mini into ``out`` (skipped when a complete build of the same version, seed and
    size is there). Another existing folder is only replaced with ``force=True``."""
    if size not in SIZES:
        raise DrakeDataError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    out = Path(out).expanduser().resolve()
    want = {"version": MINI_VERSION, "seed": seed, "size": size}
    existing = read_manifest(out)
    if existing is not None and all(existing.get(k) == v for k, v in want.items()):
        log.info("DRAKE-mini already built at %s (seed %d, size %s): skipped", out, seed, size)
        return out
    if out.exists() and any(out.iterdir()) and not force:
        have = {k: existing.get(k) for k in want} if existing else "no complete DRAKE-mini build"
        raise DrakeDataError(f"{out} exists and holds {have}, not {want}; pass force=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = _write_all(tmp, seed, size)
        hashes = file_hashes(tmp)
        manifest["counts"]["files"] = len(hashes)
        total = sum((tmp / p).stat().st_size for p in hashes)
        manifest["total_bytes"] = total
        manifest["files"] = hashes
        seconds = time.perf_counter() - start
        atomic_write_text(tmp / "README.md", _readme(manifest, seconds, total))
        atomic_write_text(tmp / "manifest.json", dump_json(manifest))  # last: marks the build complete
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:
                again = read_manifest(out)  # a concurrent builder finished first
                if again is not None and all(again.get(k) == v for k, v in want.items()):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return out
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("DRAKE-mini built at %s in %.1f s (%.2f MB)", out, seconds, total / 1e6)
    return out


def attribute_pools(seed: int) -> dict[str, dict[str, tuple[np.ndarray, list[Any]]]]:
    """``{"digit"|"colour"|"shape"|"animal": {"public"|"test": (images, labels)}}`` from the pools
    of the build with ``seed``: what a linear probe of a base's image features is fitted and
    scored on (public images are what the bases are pretrained on; test images no base has seen)."""
    b = _Build(seed, "default")
    out: dict[str, dict[str, tuple[np.ndarray, list[Any]]]] = {}
    for name, source, key in (("digit", "Digits", "digit"), ("colour", "EasyVQA", "color"),
                              ("shape", "EasyVQA", "shape"), ("animal", "AnimalShapes", "animal")):
        out[name] = {}
        for split in ("public", "test"):
            pool = b.pools[source][split]
            out[name][split] = (b.sources[source].images[pool], [b.attr(source, i)[key] for i in pool])
    return out


# ---------------------------------------------------------------------------- reading back
def load_public(root: Path | str, split: str = "train") -> list[dict[str, Any]]:
    """The public split's records (disjoint from every task's data)."""
    return load_task(root, "public", 0, split)


def load_unseen(root: Path | str) -> list[TaskRef]:
    return load_task_refs(Path(root) / "unseen.json")


@dataclass(frozen=True)
class LeakageReport:
    train_images: int
    test_images: int
    public_images: int
    train_texts: int
    test_texts: int
    public_texts: int


def _pixels_hash(path: Path) -> str:
    with Image.open(path) as im:
        return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def check_leakage(root: Path | str) -> LeakageReport:
    """Raise :class:`DrakeDataError` if any image (by pixels) or text-only question is shared
    between train questions, test questions (unseen included) and the public split."""
    root = Path(root)
    groups: dict[str, dict[str, str]] = {"train": {}, "test": {}, "public": {}}  # hash -> where
    texts: dict[str, dict[str, str]] = {"train": {}, "test": {}, "public": {}}
    sc = load_scenario(root / "scenario-homogeneous.json", root)
    files: list[tuple[str, str, int, str]] = []
    for t in sc.tasks():
        files += [("train", t.dataset, t.subset_id, "train"), ("test", t.dataset, t.subset_id, "test")]
    files += [("test", t.dataset, t.subset_id, "test") for t in load_unseen(root)]
    files += [("public", "public", 0, "train"), ("public", "public", 0, "test")]
    cache: dict[str, str] = {}
    for group, dataset, subset, split in files:
        for rec in load_task(root, dataset, subset, split):
            where_ = f"{dataset}-{subset}/{split} id={rec['id']}"
            imgs = rec.get("image")
            paths = [imgs] if isinstance(imgs, str) else (imgs or [])
            for p in paths:
                if p not in cache:
                    cache[p] = _pixels_hash(root / p)
                groups[group].setdefault(cache[p], where_)
            if not paths:
                texts[group].setdefault(" ".join(rec["conversations"][0]["value"].lower().split()), where_)
    for a, c in (("train", "test"), ("public", "train"), ("public", "test")):
        for kind, sets in (("image", groups), ("text", texts)):
            shared = sets[a].keys() & sets[c].keys()
            if shared:
                h = sorted(shared)[0]
                raise DrakeDataError(f"{root}: {len(shared)} {kind}(s) shared by {a} and {c}, e.g. "
                                     f"{sets[a][h]} and {sets[c][h]}")
    return LeakageReport(len(groups["train"]), len(groups["test"]), len(groups["public"]),
                         len(texts["train"]), len(texts["test"]), len(texts["public"]))


def verify_build(root: Path | str) -> dict[str, Any]:
    """Check the manifest's hashes against the files, then leakage; returns the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise DrakeDataError(f"{root}: no DRAKE-mini manifest.json (incomplete or not a DRAKE-mini build)")
    now = file_hashes(root)
    if now != manifest["files"]:
        changed = sorted(set(now.items()) ^ set(manifest["files"].items()))
        raise DrakeDataError(f"{root}: files differ from manifest.json, e.g. {changed[0][0]}")
    check_leakage(root)
    return manifest


def write_scaled_scenario(root: Path | str, clients: int, name: str = "load") -> str:
    """``scenario-NAME.json``: ``clients`` clients of one task each, models as in two-families, for
    load tests; beyond DRAKE-mini's client tasks, copies of them under new subset ids (a task
    belongs to one client). Returns the scenario's name (the run config's ``scenario``)."""
    root = Path(root)
    base = json.loads((root / "scenario-two-families.json").read_text())
    refs = [ref for entry in base for ref in entry["datasets"]]
    models = [entry["model_id"] for entry in base]
    entries = []
    for c in range(clients):
        ref = dict(refs[c % len(refs)])
        if c >= len(refs):
            copy = 100 + c
            for split in ("train", "test"):
                folder = root / ref["dataset"] / split
                shutil.copy(folder / f"dataset-{ref['subset_id']}.json", folder / f"dataset-{copy}.json")
            ref["subset_id"] = copy
        entries.append({"client_id": c, "model_id": models[c % len(models)], "datasets": [ref]})
    atomic_write_text(root / f"scenario-{name}.json", json.dumps(entries, indent=1))
    return name
