"""DRAKE-mini copies whose client tasks train on other questions: fewer (``subsample``: does sharing
pay more when clients have little data?) or a peer's questions of the same kind added
(``pool-kind``: how much Self could a client gain from its peers' raw data at best?).

Only client tasks' train splits change. Test splits, the public split, the unseen tasks and the
scenario files are copied unchanged, so the base models prepared for the source (keyed by the
public split's digest) serve the copy too. The copy's manifest records the new train counts, the
SHA-256 of the rewritten files and where it came from (``subsampled_from`` / ``pooled_from``).

``subsample --train n`` keeps the first ``n`` questions of every client task (the builder shuffles
each split, so they are a random subset with about balanced answers).

``pool-kind --scenario FILE`` appends to every client task T the train questions of the other
clients' tasks of T's kind (``tasks.json``'s ``kind``) that start no later than T in the scenario's
streams (``--when earlier``), or at any time (``--when any``). Run ``local`` on the copy: each
client trains alone on what a federation could at most have shared with it as data (a bound
on what data can give, not on sharing parameters, which also carries the peers' training
steps). Its Others are not meaningful (a client has trained on some of its peers' tasks).

``rehearsal`` computes, with the clients' replay memory, the share of a client's training draws
that go to its first task once its second has begun, for a given number of new samples a round:
what a pooled copy's extra data takes from the rehearsal of earlier tasks at a fixed step budget.

Put one copy per seed under a cache of its own, next to the source cache's prepared bases and
models, and run ``fedmosaic compare`` there (``bench/group_oracle.py`` for the skill-group split):

    python bench/drake_train_copies.py subsample /tmp/fm8/drake-mini-seed5 /tmp/sc/drake-mini-seed5 --train 30
    python bench/drake_train_copies.py pool-kind /tmp/fm8/drake-mini-seed5 /tmp/pool/drake-mini-seed5 \\
        --scenario /tmp/fm8/drake-mini-seed5/scenario-homogeneous.json
    ln -s /tmp/fm8/bases /tmp/fm8/models /tmp/sc/
    FEDMOSAIC_CACHE=/tmp/sc fedmosaic compare --strategies local,fedavg,fedmosaic --seeds 5 ...
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import typer

from drake_data.layout import load_scenario
from drake_data.mini.builder import read_manifest
from drake_data.streams import ReplayMemory
from fedmosaic_core.storage import atomic_write_text

app = typer.Typer(add_completion=False)


class When(str, Enum):
    earlier = "earlier"
    any = "any"


def _manifest(source: Path) -> dict:
    manifest = read_manifest(source)
    if manifest is None:
        raise typer.BadParameter(f"{source}: no DRAKE-mini manifest.json")
    return manifest


def _train_file(task: dict) -> str:
    return f"{task['dataset']}/train/dataset-{task['subset_id']}.json"


def copy_with_train_splits(
    source: Path, out: Path, rewrite: Callable[[dict, list], list], provenance: tuple[str, dict]
) -> dict:
    """Copy ``source`` to ``out`` with every client task's train records replaced by
    ``rewrite(task, records)``; returns the new manifest. ``out`` must not exist (it appears
    complete or not at all)."""
    manifest = _manifest(source)
    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for task in manifest["tasks"]:
            if task.get("client") is None:  # an unseen task: test split only
                continue
            rel = _train_file(task)
            records = rewrite(task, json.loads((source / rel).read_text()))
            text = json.dumps(records, indent=1)
            atomic_write_text(tmp / rel, text)
            manifest["files"][rel] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            task["train"] = len(records)
        key, value = provenance
        manifest[key] = {"path": str(source.resolve()), **value}
        manifest["total_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def subsample_train(source: Path, out: Path, train: int) -> dict:
    """``source`` copied to ``out`` with every client task's train split cut to its first ``train`` questions."""
    if train < 1:
        raise typer.BadParameter(f"--train must be at least 1, got {train}")

    def first(task: dict, records: list) -> list:
        if len(records) < train:
            raise typer.BadParameter(f"{_train_file(task)} holds {len(records)} train questions, fewer than --train {train}")
        return records[:train]

    return copy_with_train_splits(source, out, first, ("subsampled_from", {"train": train}))


def kind_peers(manifest: dict, scenario_file: Path, when: str) -> dict[str, list[str]]:
    """Client task key → the keys of the other clients' tasks of its kind that start no later in the
    scenario's streams (``earlier``: position in the client's task list, every task running the same
    number of rounds) or at any time (``any``)."""
    if when not in ("earlier", "any"):
        raise typer.BadParameter(f"--when must be 'earlier' or 'any', got {when!r}")
    scenario = load_scenario(scenario_file)
    start = {t.key: j for c in scenario.clients for j, t in enumerate(c.datasets)}
    tasks = {t["key"]: t for t in manifest["tasks"] if t.get("client") is not None}
    if set(start) != set(tasks):
        raise typer.BadParameter(
            f"{scenario_file} trains {sorted(start)}, the build's client tasks are {sorted(tasks)}"
        )
    return {
        key: [
            other for other, o in tasks.items()
            if o["client"] != t["client"] and o["kind"] == t["kind"] and (when == "any" or start[other] <= start[key])
        ]
        for key, t in tasks.items()
    }


def pool_kind(source: Path, out: Path, scenario_file: Path, when: str = "earlier") -> dict:
    """``source`` copied to ``out`` with every client task's train split followed by those of its
    ``kind_peers``."""
    manifest = _manifest(source)
    peers = kind_peers(manifest, scenario_file, when)
    files = {t["key"]: _train_file(t) for t in manifest["tasks"] if t.get("client") is not None}

    def pooled(task: dict, records: list) -> list:
        return records + [r for key in peers[task["key"]] for r in json.loads((source / files[key]).read_text())]

    return copy_with_train_splits(
        source, out, pooled, ("pooled_from", {"scenario": str(scenario_file.resolve()), "when": when, "peers": peers})
    )


def first_task_share(first: int, later: int, steps: int, batch_size: int, rounds_per_task: int, seed: int) -> list[float]:
    """The share of a client's training draws that go to its first task's samples in each round
    of its second task, under the client's replay memory (``drake_data.streams.ReplayMemory``):
    ``first`` then ``later`` new samples a round, ``steps`` batches of ``batch_size`` a round."""
    memory = ReplayMemory(seed=seed)
    shares = []
    for round_index in range(2 * rounds_per_task):
        second = round_index >= rounds_per_task
        memory.add([f"{'later' if second else 'first'}-{round_index}-{i}" for i in range(later if second else first)])
        drawn = [key for _ in range(steps) for key in memory.sample(batch_size)]
        if second:
            shares.append(sum(key.startswith("first-") for key in drawn) / len(drawn))
    return shares


@app.command()
def rehearsal(
    first: int = typer.Option(30, help="new samples a round while the client trains its first task"),
    later: list[int] = typer.Option([30, 60], help="new samples a round on its second task (one row each)"),
    steps: list[int] = typer.Option([32], help="batches a round (one row each)"),
    batch_size: int = typer.Option(8),
    rounds_per_task: int = typer.Option(4),
    seeds: int = typer.Option(20, help="replay-memory seeds averaged"),
) -> None:
    """How much of a client's training rehearses its first task once its second begins, when the
    second brings ``later`` new samples a round (a pooled copy doubles them)."""
    typer.echo("| new samples a round (first task → second) | batches a round | "
               + " | ".join(f"round {rounds_per_task + k + 1}" for k in range(rounds_per_task)) + " |")
    typer.echo("|---" * (2 + rounds_per_task) + "|")
    for n in later:
        for k in steps:
            rows = [first_task_share(first, n, k, batch_size, rounds_per_task, seed) for seed in range(seeds)]
            means = [sum(r[i] for r in rows) / seeds for i in range(rounds_per_task)]
            typer.echo(f"| {first} → {n} | {k} | " + " | ".join(f"{m:.2f}" for m in means) + " |")


@app.command()
def subsample(source: Path, out: Path, train: int = typer.Option(..., help="train questions kept per client task")) -> None:
    """Copy a DRAKE-mini build with ``--train`` questions per client task's train split."""
    manifest = subsample_train(source, out, train)
    cut = sum(task.get("client") is not None for task in manifest["tasks"])
    typer.echo(f"{out}: {cut} client tasks cut to {train} train questions each")


@app.command("pool-kind")
def pool_kind_command(
    source: Path,
    out: Path,
    scenario: Path = typer.Option(..., help="the scenario file whose streams decide what starts earlier"),
    when: When = typer.Option(When.earlier, help="'earlier': peers' tasks that start no later; 'any': all of them"),
) -> None:
    """Copy a DRAKE-mini build with every client task trained on its kind's questions of the other clients."""
    manifest = pool_kind(source, out, scenario, when.value)
    for key, others in manifest["pooled_from"]["peers"].items():
        typer.echo(f"{key}: + {', '.join(others) or 'nothing'}")


if __name__ == "__main__":
    app()
