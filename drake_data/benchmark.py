"""The published DRAKE benchmark: task registry, client map, unseen tasks, scenarios, data root.

The registry files live in ``drake_data/registry/drake/`` (JSON, shipped inside the Flower app
bundle): the authors' published scenario files, converted by :mod:`drake_data.convert_reference`;
``provenance.json`` there records the source commit and each file's hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from drake_data.errors import DrakeDataError
from drake_data.layout import Scenario, TaskRef, load_scenario

REGISTRY_DIR = Path(__file__).resolve().parent / "registry" / "drake"
HUB_REPO_ID = "SNUMPR/DRAKE"
#: The authors' published scenarios (``python -m drake_data.convert_reference``), by short name:
#: ``homo-llama-1B``, ``hetero-llama-1B-3B``, ``hetero-llama-1B-3B-8B``, ``hetero-qwen-0.5B-1.5B-3B``, ...
DRAKE_SCENARIOS = {
    p.stem: p.name for p in sorted(REGISTRY_DIR.glob("*.json"))
    if p.name not in ("task-list.json", "provenance.json") and not p.name.startswith("unseen-")
}
UNSEEN_FILES = ("unseen-newtasktype.json", "unseen-newvisualdomain.json")
ROOT_ENV = "DRAKE_ROOT"


def _registry_json(name: str) -> Any:
    with (REGISTRY_DIR / name).open(encoding="utf-8") as fh:
        return json.load(fh)


def drake_tasks() -> list[dict[str, Any]]:
    """The 40 tasks as the authors list them (``dataset``, ``subset_id``, ``type``, ``Desc``),
    each with a ``label`` ``<dataset>-<subset_id>``."""
    return [{"label": f"{t['dataset']}-{t['subset_id']}", **t} for t in _registry_json("task-list.json")]


def drake_client_map() -> dict[int, list[str]]:
    """client id → its task labels in stream order (the same in every published scenario)."""
    return {c.client_id: [t.key for t in c.datasets] for c in drake_scenario("homo-llama-1B").clients}


def drake_unseen_tasks() -> list[TaskRef]:
    """The unseen (generalisation) tasks of both published unseen settings (new task type, new
    visual domain), in file order."""
    out: list[TaskRef] = []
    for name in UNSEEN_FILES:
        for client in load_scenario(REGISTRY_DIR / name).clients:
            out += [t for t in client.datasets if t not in out]
    return out


def drake_scenario(name: str, root: Path | str | None = None) -> Scenario:
    """One of :data:`DRAKE_SCENARIOS` (with ``root``: every task file is checked to exist)."""
    if name not in DRAKE_SCENARIOS:
        raise DrakeDataError(f"unknown DRAKE scenario {name!r}; choose one of {sorted(DRAKE_SCENARIOS)}")
    return load_scenario(REGISTRY_DIR / DRAKE_SCENARIOS[name], root)


def resolve_drake_root(root: Path | str | None = None) -> Path:
    """The local DRAKE root (argument, else ``$DRAKE_ROOT``); a clear error when it is missing."""
    chosen = root if root is not None else os.environ.get(ROOT_ENV)
    how = (
        f"DRAKE is not shipped with this project. With network access, download it once:\n"
        f"  huggingface-cli download {HUB_REPO_ID} --repo-type dataset --local-dir /data/DRAKE\n"
        f"(or per dataset: huggingface-cli download {HUB_REPO_ID} Fashion200K.tar ... then untar),\n"
        f"then pass --drake-root /data/DRAKE or set ${ROOT_ENV}=/data/DRAKE. "
        f"Offline, use DRAKE-mini instead: python -m drake_data.mini build --out DIR"
    )
    if chosen is None:
        raise DrakeDataError(f"no DRAKE root given. {how}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DrakeDataError(f"DRAKE root {path} does not exist. {how}")
    return path


def fetch_drake(dest: Path | str, datasets: list[str] | None = None) -> Path:
    """Download DRAKE (or some of its per-dataset archives) from the hub into ``dest``.

    Needs network and ``huggingface_hub``; refuses when ``HF_HUB_OFFLINE`` is set. Archives
    (``<Dataset>.tar``) are extracted in place.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DrakeDataError(
            f"HF_HUB_OFFLINE is set: cannot fetch {HUB_REPO_ID}. Unset it on a machine with network, "
            f"or download elsewhere and point --drake-root at the copy."
        )
    import tarfile

    from huggingface_hub import snapshot_download

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    patterns = [f"{d}.tar" for d in datasets] if datasets else None
    snapshot_download(HUB_REPO_ID, repo_type="dataset", local_dir=dest, allow_patterns=patterns)
    for tar_path in sorted(dest.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")
        tar_path.unlink()
    return dest
