"""DRAKE-text: a small text-only benchmark in the DRAKE layout, for federations of real
pretrained LLMs (SmolLM2-135M, Gemma-3-270M) on a CPU, built from data that ships in packages.

Tasks (all multiple choice, four options, scored by option likelihood):

- ``Arithmetic-0..3`` (skill *arithmetic*, generated from the seed): two-digit addition,
  subtraction, one-by-two-digit multiplication, and which of two numbers is larger. Wrong
  options sit near the answer.
- ``Dialogue-0..3`` (skill *dialogue*, chatterbot-corpus): pick the reply that belongs to a
  message, against three replies from other conversations of the same pool. Subsets 0 and 2 are
  two disjoint parts of the chit-chat categories (every category but ``trivia`` and
  ``tech_support``, whose 929 conversations hold only 9 distinct messages), 1 and 3 two disjoint
  parts of ``trivia``. Messages and replies are unique within a pool.

``scenario-real-two-families.json``: four clients, two per family, one family member in each
skill group, so that every related pair crosses the tokenizer and architecture boundary:

    client 0  smollm2-135m  Arithmetic-0, Arithmetic-1
    client 1  gemma3-270m   Arithmetic-2, Arithmetic-3
    client 2  smollm2-135m  Dialogue-0, Dialogue-1
    client 3  gemma3-270m   Dialogue-2, Dialogue-3

The public split (``public/``, A/B alignment) holds the pools' conversation pairs that no task
uses. Every build of a seed writes the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from drake_data.errors import DrakeDataError
from drake_data.layout import dump_json, write_scenario, write_task
from drake_data.mini.builder import drake_record, mc_prompt
from drake_data.mini.sources import load_chat_corpus
from fedmosaic_core.storage import atomic_build_dir, atomic_write_text

FORMAT = "drake-text"
VERSION = "1"
TRAIN, TEST = 40, 50
POOL_OF_SUBSET = {0: "chit-chat", 1: "trivia", 2: "chit-chat", 3: "trivia"}
#: (client id, model, its tasks as (dataset, subset))
SCENARIO: list[tuple[int, str, list[tuple[str, int]]]] = [
    (0, "smollm2-135m", [("Arithmetic", 0), ("Arithmetic", 1)]),
    (1, "gemma3-270m", [("Arithmetic", 2), ("Arithmetic", 3)]),
    (2, "smollm2-135m", [("Dialogue", 0), ("Dialogue", 1)]),
    (3, "gemma3-270m", [("Dialogue", 2), ("Dialogue", 3)]),
]

Item = tuple[str, list[str], str]  # question, options, answer


def _with_near_options(rng: random.Random, answer: int) -> list[str]:
    wrong: set[int] = set()
    while len(wrong) < 3:
        candidate = answer + rng.choice([-10, -2, -1, 1, 2, 10, 11, -11])
        if candidate != answer and candidate >= 0:
            wrong.add(candidate)
    options = [str(v) for v in [answer, *sorted(wrong)]]
    rng.shuffle(options)
    return options


def _arithmetic(kind: int, rng: random.Random) -> Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind == 0:
        return f"What is {a} + {b}?", _with_near_options(rng, a + b), str(a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", _with_near_options(rng, a - b), str(a - b)
    if kind == 2:
        c = rng.randint(2, 9)
        return f"What is {c} × {b}?", _with_near_options(rng, c * b), str(c * b)
    while a == b:
        b = rng.randint(10, 99)
    others = [str(v) for v in rng.sample([v for v in range(10, 100) if v not in (a, b)], 2)]
    options = [str(a), str(b), *others]
    rng.shuffle(options)
    return f"Which is larger, {a} or {b}?", options, str(max(a, b))


def _usable(reply: str) -> bool:
    """A reply that reads as one option of a ``Choice list:[...]`` (no separators, brackets,
    quotes or code)."""
    return all(ch not in reply for ch in ',[]|`"') and 0 < len(reply) <= 90


def _pool(corpus: dict[str, list[list[str]]], pool: str) -> list[tuple[str, str]]:
    """(message, reply) pairs of a pool, each message and each reply once, in corpus order."""
    categories = ["trivia"] if pool == "trivia" else [c for c in sorted(corpus) if c not in ("trivia", "tech_support")]
    messages: set[str] = set()
    replies: set[str] = set()
    pairs = []
    for category in categories:
        for conversation in corpus.get(category, []):
            if len(conversation) < 2:
                continue
            message, reply = conversation[0], conversation[1]
            if _usable(reply) and len(message) <= 120 and message.lower() not in messages and reply not in replies:
                messages.add(message.lower())
                replies.add(reply)
                pairs.append((message, reply))
    return pairs


def _dialogue_items(pairs: list[tuple[str, str]], rng: random.Random) -> list[Item]:
    replies = sorted({reply for _, reply in pairs})
    items = []
    for message, reply in pairs:
        wrong = rng.sample([r for r in replies if r != reply], 3)
        options = [reply, *wrong]
        rng.shuffle(options)
        items.append((f"Which reply belongs to this message?\n{message}", options, reply))
    return items


def _records(key: str, split: str, items: list[Item]) -> list[dict[str, Any]]:
    return [drake_record(f"{key}-{split}-{i:05d}", [], mc_prompt(0, q, options), answer)
            for i, (q, options, answer) in enumerate(items)]


def _task_items(seed: int) -> dict[tuple[str, int], list[Item]]:
    """Every task's items, train first (TRAIN of them), then test (TEST)."""
    tasks: dict[tuple[str, int], list[Item]] = {}
    for kind in range(4):
        rng = random.Random(f"{seed}/arithmetic/{kind}")
        seen: set[str] = set()
        items: list[Item] = []
        while len(items) < TRAIN + TEST:
            item = _arithmetic(kind, rng)
            if item[0] not in seen:
                seen.add(item[0])
                items.append(item)
        tasks[("Arithmetic", kind)] = items
    for pool, pairs in _shuffled_pools(seed).items():
        subsets = [s for s, p in POOL_OF_SUBSET.items() if p == pool]
        if len(pairs) < len(subsets) * (TRAIN + TEST):
            raise DrakeDataError(f"chatterbot-corpus pool {pool!r} has {len(pairs)} usable pairs, "
                                 f"{len(subsets) * (TRAIN + TEST)} needed")
        for i, subset in enumerate(subsets):  # disjoint parts
            part = pairs[i * (TRAIN + TEST):(i + 1) * (TRAIN + TEST)]
            tasks[("Dialogue", subset)] = _dialogue_items(part, random.Random(f"{seed}/options/{subset}"))
    return tasks


def _shuffled_pools(seed: int) -> dict[str, list[tuple[str, str]]]:
    corpus = load_chat_corpus()
    pools = {}
    for pool in sorted(set(POOL_OF_SUBSET.values())):
        pairs = _pool(corpus, pool)
        random.Random(f"{seed}/dialogue/{pool}").shuffle(pairs)
        pools[pool] = pairs
    return pools


def _public(seed: int) -> list[dict[str, Any]]:
    """The pools' pairs after the ones the tasks take."""
    pairs = []
    for pool, shuffled in _shuffled_pools(seed).items():
        used = sum(1 for p in POOL_OF_SUBSET.values() if p == pool) * (TRAIN + TEST)
        pairs += shuffled[used:]
    return [drake_record(f"public-train-{i:05d}", [], message, reply) for i, (message, reply) in enumerate(pairs)]


def build_drake_text(out: Path | str, seed: int = 0) -> Path:
    """Write DRAKE-text for ``seed`` into ``out`` (built whole in a temporary folder, then
    renamed; an existing complete build of the same seed is kept). Returns ``out``."""
    out = Path(out)
    if (out / "manifest.json").is_file():
        return out

    def write(tmp: Path) -> None:
        manifest_tasks = []
        for (dataset, subset), items in sorted(_task_items(seed).items()):
            key = f"{dataset}-{subset}"
            write_task(tmp, dataset, subset, "train", _records(key, "train", items[:TRAIN]))
            write_task(tmp, dataset, subset, "test", _records(key, "test", items[TRAIN:]))
            skill = "arithmetic" if dataset == "Arithmetic" else POOL_OF_SUBSET[subset]
            manifest_tasks.append({"key": key, "dataset": dataset, "subset_id": subset, "type": "multi-choice",
                                   "skill": skill, "train": TRAIN, "test": TEST})
        write_task(tmp, "public", 0, "train", _public(seed))
        scenario = [{"client_id": cid, "model_id": model,
                     "datasets": [{"dataset": d, "subset_id": s, "type": "multi-choice"} for d, s in tasks]}
                    for cid, model, tasks in SCENARIO]
        write_scenario(tmp / "scenario-real-two-families.json", scenario)
        atomic_write_text(tmp / "manifest.json", dump_json({"format": FORMAT, "version": VERSION, "seed": seed,
                                                           "tasks": manifest_tasks}))
        atomic_write_text(tmp / "tasks.json", dump_json(manifest_tasks))  # each task's skill group

    return atomic_build_dir(out, write)

