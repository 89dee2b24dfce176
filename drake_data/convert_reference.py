"""Convert the authors' DRAKE scenario files into ``drake_data/registry/drake/``.

The reference repository (``snumprlab/fedmosaic``) publishes its scenarios as
``scenarios/DRAKE_<setting>.json`` (a list of clients with their model id and ordered tasks) and
the 40-task list ``scenarios/DRAKE_task_list.json``. This writes each one, as published (subset
ids and model ids included), under a short name (``DRAKE_hetero_llava_llama_1B_3B.json`` →
``hetero-llama-1B-3B.json``), and records the source commit and the SHA-256 of each source file's
canonical JSON in ``provenance.json``; ``tests/test_drake_layout.py`` checks the registry against
those hashes, key for key.

    python -m drake_data.convert_reference /path/to/fedmosaic-checkout --commit <sha>
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer

from drake_data.errors import DrakeDataError
from drake_data.layout import dump_json, parse_scenario
from fedmosaic_core.storage import atomic_write_text

REGISTRY = Path(__file__).resolve().parent / "registry" / "drake"
SOURCE_REPO = "https://github.com/snumprlab/fedmosaic"
TASK_LIST = "DRAKE_task_list.json"


def canonical_sha256(data: Any) -> str:
    """SHA-256 of ``data`` as sorted-key, compact JSON (independent of the file's whitespace)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def registry_name(source_name: str) -> str:
    """``DRAKE_hetero_llava_qwen_0_5B_1_5B_3B.json`` → ``hetero-qwen-0.5B-1.5B-3B.json``."""
    stem = source_name.removesuffix(".json").removeprefix("DRAKE_").replace("llava_", "")
    stem = stem.replace("_5B", ".5B").replace("_", "-")
    return f"{stem}.json"


def convert(checkout: Path, commit: str, out: Path = REGISTRY) -> dict[str, Any]:
    """Write every ``scenarios/DRAKE_*.json`` of ``checkout`` into ``out``; returns the provenance."""
    sources = sorted((checkout / "scenarios").glob("DRAKE_*.json"))
    if not sources:
        raise DrakeDataError(f"{checkout}: no scenarios/DRAKE_*.json (is it a snumprlab/fedmosaic checkout?)")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for path in sources:
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name != TASK_LIST:
            parse_scenario(data, str(path))  # a scenario our loader cannot read is refused here
        name = registry_name(path.name)
        atomic_write_text(out / name, dump_json(data))
        files[name] = {"source": f"scenarios/{path.name}", "sha256": canonical_sha256(data)}
    provenance = {"source": SOURCE_REPO, "commit": commit, "files": files}
    atomic_write_text(out / "provenance.json", dump_json(provenance))
    return provenance


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(checkout: Path, commit: str = typer.Option(..., help="the checkout's commit (recorded)")) -> None:
    provenance = convert(checkout, commit)
    typer.echo(f"wrote {len(provenance['files'])} files to {REGISTRY}")


if __name__ == "__main__":
    app()
