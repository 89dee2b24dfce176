"""Shared-seed compression of a task vector before upload.

The server only needs ``s_ij = mean_c cos(ĝ_i[:, c], ĝ_j[:, c])``. Every client, with the same
seed, keeps the same random subset of ``num_columns`` columns and maps each kept column (length
``rows``) through its own count sketch with ``sketch_dim`` buckets (a seeded bucket and ±1 sign
per row and column): ``z[b, c] = Σ_{r: h_c(r)=b} σ_c(r) · ĝ[r, c]``. A count sketch preserves
inner products in expectation, so ``cos(z_i[:, c], z_j[:, c]) ≈ cos(ĝ_i[:, c], ĝ_j[:, c])``;
independent sketches per column make the errors average out over columns. The result is a
``sketch_dim × num_columns`` float32 array that :func:`task_similarity` takes as it is.

Clients and server must use the same seed, sizes and the same numpy bit generator (PCG64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TaskVectorCompression:
    """Sizes and shared seed of the task-vector sketch (same on every client)."""

    seed: int = 0
    sketch_dim: int = 8
    num_columns: int | None = None  # None: keep every column

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TaskVectorCompression.seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.sketch_dim, int) or self.sketch_dim < 2:
            raise ValueError(f"TaskVectorCompression.sketch_dim must be an int >= 2, got {self.sketch_dim!r}")
        if self.num_columns is not None and (not isinstance(self.num_columns, int) or self.num_columns < 1):
            raise ValueError(
                f"TaskVectorCompression.num_columns must be None or an int >= 1, got {self.num_columns!r}"
            )

    @classmethod
    def for_shape(
        cls, rows: int, cols: int, *, min_ratio: float = 100.0, sketch_dim: int = 8, seed: int = 0
    ) -> TaskVectorCompression:
        """The largest sketch of ``rows × cols`` task vectors that is ``min_ratio``× smaller."""
        budget = rows * cols / min_ratio
        num_columns = min(cols, math.floor(budget / sketch_dim))
        if num_columns < 1:
            raise ValueError(
                f"TaskVectorCompression.for_shape: a {rows}×{cols} task vector cannot be "
                f"compressed {min_ratio}× with sketch_dim={sketch_dim}"
            )
        return cls(seed=seed, sketch_dim=sketch_dim, num_columns=num_columns)

    def compressed_shape(self, rows: int, cols: int) -> tuple[int, int]:
        kept = cols if self.num_columns is None else self.num_columns
        if kept > cols:
            raise ValueError(f"TaskVectorCompression: num_columns={kept} exceeds the {cols} columns")
        return (self.sketch_dim, kept)

    def byte_ratio(self, rows: int, cols: int) -> float:
        """Bytes of the uncompressed fp32 task vector over bytes of the sketch."""
        sketch_rows, kept = self.compressed_shape(rows, cols)
        return (rows * cols) / (sketch_rows * kept)


@lru_cache(maxsize=8)
def _sketch_plan(
    seed: int, rows: int, cols: int, sketch_dim: int, kept: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept column indices, flat bucket index per (kept column, row), ±1 sign per same)."""
    rng = np.random.Generator(np.random.PCG64([seed, rows, cols, sketch_dim, kept]))
    columns = np.sort(rng.permutation(cols)[:kept]) if kept < cols else np.arange(cols)
    buckets = rng.integers(0, sketch_dim, size=(kept, rows))
    signs = rng.integers(0, 2, size=(kept, rows)).astype(np.float64) * 2.0 - 1.0
    flat_index = (np.arange(kept)[:, None] * sketch_dim + buckets).reshape(-1)
    for array in (columns, flat_index, signs):
        array.flags.writeable = False
    return columns, flat_index, signs


def compress_task_vector(task_vector: Any, config: TaskVectorCompression) -> np.ndarray:
    """Sketch a ``rows × cols`` task vector (numpy or torch) into ``sketch_dim × num_columns``
    float32; column-wise cosines of sketches approximate those of the originals."""
    if isinstance(task_vector, torch.Tensor):
        task_vector = task_vector.detach().cpu().float().numpy()
    g = np.asarray(task_vector, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"compress_task_vector: expected a 2-D task vector, got shape {g.shape}")
    if not np.isfinite(g).all():
        raise ValueError("compress_task_vector: the task vector has NaN or Inf values")
    rows, cols = g.shape
    sketch_dim, kept = config.compressed_shape(rows, cols)
    columns, flat_index, signs = _sketch_plan(config.seed, rows, cols, sketch_dim, kept)
    values = (g[:, columns].T * signs).reshape(-1)  # kept × rows, signed
    sketch = np.bincount(flat_index, weights=values, minlength=kept * sketch_dim)
    return sketch.reshape(kept, sketch_dim).T.astype(np.float32)


compress = compress_task_vector
