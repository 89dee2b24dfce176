"""DRAKE-mini with fewer training questions per task: does sharing pay more when clients have little data?

The command copies a DRAKE-mini build and keeps the first ``n`` questions of every client task's
train split (the builder shuffles each split, so the first ``n`` are a random subset with about
balanced answers). Test splits, the public split, the unseen tasks and the scenario files are
copied unchanged, so the base models prepared for the source (keyed by the public split's digest)
serve the copy too. The copy's manifest records the new train counts, the SHA-256 of the rewritten
files and where it came from.

Put one copy per seed under a cache of its own, next to the source cache's prepared bases and
models, and run ``fedmosaic compare`` there (``bench/group_oracle.py`` for the skill-group split):

    python bench/data_scarcity.py /tmp/fm8/drake-mini-seed5 /tmp/sc/drake-mini-seed5 --train 30
    ln -s /tmp/fm8/bases /tmp/fm8/models /tmp/sc/
    FEDMOSAIC_CACHE=/tmp/sc fedmosaic compare --strategies local,fedavg,fedmosaic --seeds 5 ...
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import typer

from drake_data.mini.builder import read_manifest
from fedmosaic_core.storage import atomic_write_text

app = typer.Typer(add_completion=False)


def subsample_train(source: Path, out: Path, train: int) -> dict:
    """Copy ``source`` to ``out`` with every client task's train split cut to its first ``train``
    questions; returns the new manifest. ``out`` must not exist (it appears complete or not at all)."""
    manifest = read_manifest(source)
    if manifest is None:
        raise typer.BadParameter(f"{source}: no DRAKE-mini manifest.json")
    if train < 1:
        raise typer.BadParameter(f"--train must be at least 1, got {train}")
    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for task in manifest["tasks"]:
            if task.get("client") is None:  # an unseen task: test split only
                continue
            rel = f"{task['dataset']}/train/dataset-{task['subset_id']}.json"
            records = json.loads((tmp / rel).read_text())
            if len(records) < train:
                raise typer.BadParameter(f"{rel} holds {len(records)} train questions, fewer than --train {train}")
            text = json.dumps(records[:train], indent=1)
            atomic_write_text(tmp / rel, text)
            manifest["files"][rel] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            task["train"] = train
        manifest["subsampled_from"] = {"path": str(source.resolve()), "train": train}
        manifest["total_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@app.command()
def subsample(source: Path, out: Path, train: int = typer.Option(..., help="train questions kept per client task")) -> None:
    """Copy a DRAKE-mini build with ``--train`` questions per client task's train split."""
    manifest = subsample_train(source, out, train)
    cut = sum(task.get("client") is not None for task in manifest["tasks"])
    typer.echo(f"{out}: {cut} client tasks cut to {train} train questions each")


if __name__ == "__main__":
    app()
