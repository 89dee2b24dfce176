"""The published DRAKE benchmark: task registry, client map, unseen tasks, scenarios, data root.

The registry files live in ``drake_data/registry/`` (JSON, shipped inside the Flower app bundle);
``provenance.json`` there says where each comes from and what is reconstructed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from drake_data.errors import DrakeDataError
from drake_data.layout import Scenario, TaskRef, load_scenario, load_task_refs

REGISTRY_DIR = Path(__file__).resolve().parent / "registry"
HUB_REPO_ID = "SNUMPR/DRAKE"
DRAKE_SCENARIOS = {
    "homogeneous": "scenario-drake-homogeneous.json",
    "1B-3B": "scenario-drake-1B-3B.json",
    "cross-family": "scenario-drake-cross-family.json",
}
ROOT_ENV = "DRAKE_ROOT"


def _registry_json(name: str) -> Any:
    with (REGISTRY_DIR / name).open(encoding="utf-8") as fh:
        return json.load(fh)


def drake_tasks() -> list[dict[str, Any]]:
    """The 40 tasks: ``label``, ``dataset``, ``subset_id``, ``type``, ``client_id``, ``order``."""
    return list(_registry_json("drake_tasks.json"))


def drake_client_map() -> dict[int, list[str]]:
    """client id → its 4 task labels, in stream order (docs/method.md, "DRAKE" table)."""
    return {int(k): list(v) for k, v in _registry_json("drake_clients.json").items()}


def drake_unseen_tasks() -> list[TaskRef]:
    """The unseen (generalisation) tasks."""
    return load_task_refs(REGISTRY_DIR / "drake_unseen.json")


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
