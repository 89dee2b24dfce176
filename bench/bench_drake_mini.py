"""DRAKE-mini build figures: build time, size on disk, verify time, rendering throughput.

Run: ``python bench/bench_drake_mini.py [--size default] [--seed 0]`` (builds into a temp folder).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer

from drake_data import load_scenario, load_task, render_sample
from drake_data.mini import build_drake_mini, load_public, verify_build

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    size: str = typer.Option("default", help="DRAKE-mini size (default, tiny)"),
    seed: int = typer.Option(0, help="the build seed"),
) -> None:
    """Build DRAKE-mini into a temp folder and print its figures."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = build_drake_mini(Path(tmp) / "drake-mini", seed=seed, size=size)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = verify_build(root)
        verify_s = time.perf_counter() - t0
        sc = load_scenario(root / "scenario-homogeneous.json", root)
        t0 = time.perf_counter()
        n = 0
        for t in sc.tasks():
            for rec in load_task(root, t.dataset, t.subset_id, "train"):
                render_sample(rec, root, task_type=t.type)
                n += 1
        render_s = time.perf_counter() - t0
        tasks = manifest["tasks"]
        print(f"size={size} seed={seed}")
        print(f"build: {build_s:.2f} s   verify (hashes + leakage): {verify_s:.2f} s")
        print(f"files: {len(manifest['files'])}   images: {manifest['counts']['images']}   "
              f"bytes: {manifest['total_bytes'] / 1e6:.2f} MB")
        print(f"tasks: {sum(t['client'] is not None for t in tasks)} client + "
              f"{sum(t['client'] is None for t in tasks)} unseen; train/test per task: "
              f"{min(t['train'] for t in tasks if t['client'] is not None)}-{max(t['train'] for t in tasks)} / "
              f"{min(t['test'] for t in tasks)}-{max(t['test'] for t in tasks)}")
        print(f"public: {len(load_public(root))} train records")
        print(f"render_sample: {n} train samples in {render_s:.2f} s ({1e3 * render_s / n:.2f} ms/sample)")


if __name__ == "__main__":
    app()
