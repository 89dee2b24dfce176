"""RELA task-vector compression: relevance-weight error vs byte ratio on real task vectors.

Six clients, one task each (three chatterbot-corpus categories, three easy-vqa question types,
byte-level tokens), probe = a tiny randomly initialised Llama-shaped model; every client runs
3 probe updates of 8 samples (sanitised, averaged). For several sketch sizes at ≥ 100× fewer
bytes and 10 sketch seeds: max |w − w_compressed| of the relevance weights (τ = 0.5). Also the
Llama-3.2-1B ratio (analytic) and the time to compress one Llama-3.2-1B-shaped task vector.

    python bench/bench_rela_compression.py [--shape 256x1024 --shape 512x2048] [--sketch-dim 4 ...] [--seeds 10]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer

from fedmosaic_core.rela import (
    TaskVectorCompression,
    compress_task_vector,
    relevance_weights,
    task_similarity,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # shared fixture data
from demo_batches import probed_task_vectors  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    shape: list[str] = typer.Option(["256x1024", "512x2048"], help="probe d_model x d_ff (repeatable)"),
    sketch_dim: list[int] = typer.Option([4, 8, 16], help="sketch rows (repeatable)"),
    seeds: int = typer.Option(10, help="sketch seeds per size"),
) -> None:
    """Relevance-weight error of compressed task vectors at >= 100x fewer bytes."""
    torch.set_num_threads(1)

    print(f"{'d_model x d_ff':>14} {'sketch':>10} {'ratio':>7} {'max|dw| mean':>12} {'worst':>7} {'<=0.02':>7}")
    for probe_shape in shape:
        d_model, d_ff = (int(x) for x in probe_shape.split("x"))
        vectors = probed_task_vectors(d_model, d_ff)
        rows, cols = vectors[0].shape
        weights = relevance_weights(task_similarity(vectors))
        for rows_kept in sketch_dim:
            errors = []
            for seed in range(seeds):
                config = TaskVectorCompression.for_shape(rows, cols, min_ratio=100, sketch_dim=rows_kept, seed=seed)
                compressed = [compress_task_vector(g, config) for g in vectors]
                errors.append(float(np.abs(relevance_weights(task_similarity(compressed)) - weights).max()))
            ok = sum(e <= 0.02 for e in errors)
            print(
                f"{probe_shape:>14} {str(config.compressed_shape(rows, cols)):>10} "
                f"{config.byte_ratio(rows, cols):>6.1f}x {np.mean(errors):>12.4f} {max(errors):>7.4f} "
                f"{ok:>4}/{len(errors)}"
            )

    rows, cols = round(0.4 * 2048), 8192
    config = TaskVectorCompression.for_shape(rows, cols, min_ratio=100)
    g = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    compress_task_vector(g, config)  # builds the cached sketch plan
    start = time.perf_counter()
    compress_task_vector(g, config)
    elapsed = time.perf_counter() - start
    sketch_rows, kept = config.compressed_shape(rows, cols)
    print(
        f"Llama-3.2-1B: task vector {rows}x{cols} fp32 = {rows * cols * 4 / 2**20:.1f} MiB -> sketch "
        f"{sketch_rows}x{kept} = {sketch_rows * kept * 4 / 2**10:.0f} KiB, ratio "
        f"{config.byte_ratio(rows, cols):.1f}x; compress time {elapsed * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    app()
