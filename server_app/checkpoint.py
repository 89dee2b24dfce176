"""Per-round checkpoints of the server state: safetensors for tensors, JSON for the rest.

Layout under ``<run_dir>/checkpoints/``: ``round-0003/{state.safetensors,state.json}`` written into
a temporary directory and renamed into place; ``LATEST`` (written atomically) names the newest
complete one. Older checkpoints beyond ``keep`` are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    run_dir: Path, server_round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{server_round:04d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".round-{server_round:04d}."))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": server_round, **meta}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "LATEST", final.name + "\n")
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(round, tensors, meta) of the newest complete checkpoint, or None when there is none."""
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {err}") from None
    return int(meta["round"]), tensors, meta
