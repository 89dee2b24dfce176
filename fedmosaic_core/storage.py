"""Everything the project writes to disk goes through here: atomic files, atomic folders,
snapshots, the cache root and a cross-process lock.

A file is written to a temporary sibling and renamed into place (``os.replace``); a folder is
built in a temporary sibling and renamed. A reader therefore sees the previous complete version
or the new complete one, never half of one. A snapshot is a folder of ``<name>.safetensors`` +
``<name>.json``, used for the server's checkpoints and every client's per-round state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where tensors are written or read: paths and JSON stay light
    import torch


class SnapshotError(RuntimeError):
    """A snapshot is missing or unreadable; the message names the folder."""


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` through a temporary file in the same folder (permissions ``mode``, else
    the temporary file's 0600), fsync, then rename: readers see the old file or the new one."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write_with(path, write, mode)


def atomic_write_text(path: Path, text: str, mode: int | None = 0o644) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def json_safe(value: Any) -> Any:
    """NaN/Inf become null, tuples lists, keys strings: what strict JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: Path, data: Any, mode: int | None = 0o644) -> None:
    """``data`` as indented, key-sorted JSON through :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True), mode)


def atomic_write_with(path: Path, write: Callable[[str], object], mode: int | None = 0o644) -> None:
    """For writers that need a file name (``safetensors.save_file``, ``save_pretrained`` of one
    file): ``write(tmp_path)`` then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_build_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp_dir)`` in a temporary sibling folder, then rename it onto ``final`` (which must
    not exist, or is replaced when it does)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cache_home() -> Path:
    """Root of caches, data, runs and client state: ``$FEDMOSAIC_CACHE`` or ``~/.cache/fedmosaic``."""
    env = os.environ.get("FEDMOSAIC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmosaic"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_snapshot(final: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``final/{name}.safetensors`` and ``final/{name}.json`` atomically (replacing ``final``)."""

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    return atomic_build_dir(final, build)


def read_snapshot(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a snapshot written by :func:`write_snapshot` (no pickle)."""
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        from safetensors.torch import load_file

        tensors = load_file(str(folder / f"{name}.safetensors"))
    except (OSError, ValueError) as err:
        raise SnapshotError(f"snapshot {folder} is unreadable: {err}") from None
    return tensors, meta


def prune_rounds(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` ``round-*`` folders under ``root``."""
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
