"""Compressed task vectors: relevance weights within 0.02 of the uncompressed ones at ≥ 100×
fewer bytes, on task vectors probed from real batches of different tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from demo_batches import DEMO_TASKS, probed_task_vectors

from fedmosaic_core.rela import (
    TaskVectorCompression,
    compress_task_vector,
    relevance_weights,
    task_similarity,
)

D_MODEL, D_FF = 512, 2048


@pytest.fixture(scope="module")
def real_task_vectors() -> list[np.ndarray]:
    """One client per task: 3 probe updates of 8 real samples each, sanitised and averaged."""
    return probed_task_vectors(D_MODEL, D_FF)


def test_compressed_weights_match_uncompressed_on_real_tasks(real_task_vectors: list[np.ndarray]) -> None:
    rows, cols = real_task_vectors[0].shape
    assert (rows, cols) == (round(0.4 * D_MODEL), D_FF)
    config = TaskVectorCompression.for_shape(rows, cols, min_ratio=100, seed=0)
    compressed = [compress_task_vector(g, config) for g in real_task_vectors]
    assert all(c.dtype == np.float32 and c.shape == config.compressed_shape(rows, cols) for c in compressed)
    byte_ratio = real_task_vectors[0].astype(np.float32).nbytes / compressed[0].nbytes
    assert byte_ratio == pytest.approx(config.byte_ratio(rows, cols))
    assert byte_ratio >= 100.0

    sim = task_similarity(real_task_vectors)
    sim_c = task_similarity(compressed)
    weights, weights_c = relevance_weights(sim), relevance_weights(sim_c)
    max_diff = float(np.abs(weights - weights_c).max())
    llama_1b = TaskVectorCompression.for_shape(round(0.4 * 2048), 8192, min_ratio=100)
    print(
        f"\n[RELA compression] tiny Llama {D_MODEL}x{D_FF}: task vector {rows}x{cols} fp32 "
        f"({rows * cols * 4} B) -> sketch {compressed[0].shape} ({compressed[0].nbytes} B), "
        f"byte ratio {byte_ratio:.1f}x; max |w - w_compressed| = {max_diff:.4f}; "
        f"Llama-3.2-1B shapes: ratio {llama_1b.byte_ratio(819, 8192):.1f}x"
    )
    # The tasks are really different: the weights are not uniform ...
    assert np.ptp(weights[~np.eye(len(DEMO_TASKS), dtype=bool)]) > 0.05
    # ... and the compressed weights stay within the tolerance.
    assert max_diff <= 0.02


def test_compression_is_shared_seed_deterministic() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(40, 300))
    config = TaskVectorCompression(seed=3, sketch_dim=4, num_columns=50)
    first = compress_task_vector(g, config)
    np.testing.assert_array_equal(first, compress_task_vector(g, config))
    np.testing.assert_allclose(
        first, compress_task_vector(torch.from_numpy(g).float(), config), rtol=1e-5, atol=1e-5
    )
    assert first.shape == (4, 50)
    other = compress_task_vector(g, TaskVectorCompression(seed=4, sketch_dim=4, num_columns=50))
    assert not np.allclose(first, other)
    # Linear in g, as a sketch must be (the server may average sketches).
    h = rng.normal(size=(40, 300))
    np.testing.assert_allclose(
        compress_task_vector(2 * g + h, config), 2 * first + compress_task_vector(h, config), atol=1e-4
    )


def test_sketch_cosines_are_unbiased_on_average() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 400))
    a = base + 0.8 * rng.normal(size=base.shape)
    b = base + 0.8 * rng.normal(size=base.shape)
    exact = task_similarity([a, b])[0, 1]
    config = TaskVectorCompression(seed=0, sketch_dim=16, num_columns=400)
    approx = task_similarity([compress_task_vector(a, config), compress_task_vector(b, config)])[0, 1]
    assert abs(approx - exact) < 0.03


def test_compression_config_validation() -> None:
    with pytest.raises(ValueError, match="sketch_dim"):
        TaskVectorCompression(sketch_dim=1)
    with pytest.raises(ValueError, match="num_columns"):
        TaskVectorCompression(num_columns=0)
    with pytest.raises(ValueError, match="seed"):
        TaskVectorCompression(seed=-1)
    with pytest.raises(ValueError, match="cannot be compressed"):
        TaskVectorCompression.for_shape(4, 10, min_ratio=100)
    with pytest.raises(ValueError, match="exceeds"):
        compress_task_vector(np.ones((4, 10)), TaskVectorCompression(num_columns=11))
    with pytest.raises(ValueError, match="NaN"):
        compress_task_vector(np.full((4, 10), np.nan), TaskVectorCompression())
