"""Server side of RELA: task similarity and relevance weights.

``s_ij = mean over columns c of cos(ĝ_i[:, c], ĝ_j[:, c])`` and
``w_ij = softmax over j ≠ i of (s_ij / τ)``, the diagonal exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _as_matrix(vector: Any, index: int) -> np.ndarray:
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().cpu().float().numpy()
    array = np.asarray(vector)
    if array.ndim != 2:
        raise ValueError(
            f"task_similarity: vector {index} has shape {array.shape}; expected a 2-D "
            "(rows × columns) task vector or its compressed form"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"task_similarity: vector {index} has dtype {array.dtype}; expected float")
    return array


def task_similarity(vectors: Sequence[Any] | np.ndarray) -> np.ndarray:
    """N task vectors (each rows × cols, numpy or torch; or their compressed form) → N × N
    matrix of the column-wise cosine similarity averaged over columns.

    A zero column counts as cosine 0. Inputs must share one shape and be finite. The result is
    symmetric, float64, in [-1, 1]. Cost: one N × (rows·cols) Gram product.
    """
    if isinstance(vectors, np.ndarray) and vectors.ndim == 3:
        vectors = list(vectors)
    if len(vectors) == 0:
        raise ValueError("task_similarity: no task vectors given")
    first = _as_matrix(vectors[0], 0)
    rows, cols = first.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"task_similarity: task vectors have an empty shape {first.shape}")
    stack = np.empty((len(vectors), rows, cols), dtype=np.float32)  # each vector, its columns scaled to norm 1
    for index, vector in enumerate(vectors):
        matrix = first if index == 0 else _as_matrix(vector, index)
        if matrix.shape != first.shape:
            raise ValueError(
                f"task_similarity: vector {index} has shape {matrix.shape}, expected {first.shape}"
            )
        np.copyto(stack[index], matrix)  # float32, as the products below
        norms = np.sqrt(np.einsum("rc,rc->c", stack[index], stack[index]))  # column norms
        if not np.isfinite(norms).all():  # NaN/Inf propagate into a column's norm
            raise ValueError(f"task_similarity: vector {index} has NaN or Inf values")
        stack[index] *= np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    flat = torch.from_numpy(stack.reshape(len(vectors), rows * cols))
    gram = (flat @ flat.T).numpy().astype(np.float64) / cols  # torch's GEMM: numpy's is ~15× slower here
    gram = (gram + gram.T) / 2.0
    return np.clip(gram, -1.0, 1.0)


def relevance_weights(similarity: np.ndarray, tau: float = 0.5, include_self: bool = False) -> np.ndarray:
    """Row i = softmax of ``s_ij / τ`` over j ≠ i; diagonal exactly 0; rows sum to 1.

    ``include_self`` (beyond the paper): the softmax runs over every j, the client itself included
    with its own s_ii. A single client gives the 1 × 1 zero matrix (``include_self``: [[1]]).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"relevance_weights: similarity must be a non-empty N × N matrix, got {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("relevance_weights: similarity has NaN or Inf values")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"relevance_weights: tau must be a positive number, got {tau!r}")
    n = sim.shape[0]
    if n == 1:
        return np.ones((1, 1)) if include_self else np.zeros((1, 1))
    logits = sim / tau
    mixed = np.ones((n, n), dtype=bool) if include_self else ~np.eye(n, dtype=bool)
    logits = np.where(mixed, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.where(mixed, np.exp(logits), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights
