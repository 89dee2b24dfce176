"""Atomic on-disk snapshots: a folder of ``<name>.safetensors`` + ``<name>.json`` per round.

A snapshot is written into a temporary sibling folder and renamed into place, so a reader sees
either the previous complete snapshot or the new complete one, never half of one. Used for the
server's checkpoints and for every client's per-round state.
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


class SnapshotError(RuntimeError):
    """A snapshot is missing or unreadable; the message names the folder."""


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` through a temporary file in the same folder (permissions ``mode``, else
    the temporary file's 0600), fsync, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_snapshot(final: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``final/{name}.safetensors`` and ``final/{name}.json`` atomically (replacing ``final``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_snapshot(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a snapshot written by :func:`write_snapshot` (no pickle)."""
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        tensors = load_file(str(folder / f"{name}.safetensors"))
    except (OSError, ValueError) as err:
        raise SnapshotError(f"snapshot {folder} is unreadable: {err}") from None
    return tensors, meta


def prune_rounds(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` ``round-*`` folders under ``root``."""
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
