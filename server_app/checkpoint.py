"""Per-round checkpoints of the server state: safetensors for tensors, JSON for the rest.

Layout under ``<run_dir>/checkpoints/``: ``round-0003/{state.safetensors,state.json}`` written
atomically (:mod:`fedmosaic_core.snapshots`); ``LATEST`` (written atomically) names the newest
complete one. Older checkpoints beyond ``keep`` are removed only after the new one is in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmosaic_core.snapshots import (
    SnapshotError,
    atomic_write_text,
    prune_rounds,
    read_snapshot,
    write_snapshot,
)

__all__ = ["CheckpointError", "atomic_write_text", "load_latest_checkpoint", "save_checkpoint"]

CheckpointError = SnapshotError


def save_checkpoint(
    run_dir: Path, server_round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    root = run_dir / "checkpoints"
    final = write_snapshot(root / f"round-{server_round:04d}", "state", tensors, {"round": server_round, **meta})
    atomic_write_text(root / "LATEST", final.name + "\n")
    prune_rounds(root, keep)
    return final


def load_latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(round, tensors, meta) of the newest complete checkpoint, or None when there is none."""
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.exists():
        return None
    tensors, meta = read_snapshot(pointer.parent / pointer.read_text().strip(), "state")
    return int(meta["round"]), tensors, meta
