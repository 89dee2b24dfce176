"""RELA server aggregation: wall time vs the FLOP floor of its matrix products.

Payload per client: Llama-3.2-1B-shaped PQ state (4 blocks × 7 modules × (r² + r), r = 128)
and a compressed task vector (the default sketch of a 0.4·2048 × 8192 task vector). The FLOP
floor counts the two products that cannot be avoided: the task-similarity Gram
(2·N²·D_sketch) and the mixing ``W @ stack`` (2·N²·numel). The same-shape plain matmuls are
timed in the same run to give the machine's achievable rate: once with one operand reused for
every module (it stays in cache at small N), once with a distinct operand per module, as the
aggregation reads 28 distinct client tensors per client, and once more with distinct operands
whose results are kept until the call ends, as the aggregation keeps its N new states (a
discarded result's memory is recycled while still in cache; a kept one is written to fresh
memory). The aggregation is called as the
strategy calls it: with the schemas declared at the handshake, on replies decoded into the rows
of one round matrix (``records.decode_state(into=...)``), which it mixes in place.

    python bench/bench_rela.py [--n 10 --n 100 --n 1000] [--device cuda] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
import typer

from fedmosaic_core.rela import ClientUpdate, TaskVectorCompression, aggregate_global_states

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R = 128
BLOCKS = 4


def make_updates(n: int, sketch_shape: tuple[int, int], seed: int) -> list[ClientUpdate]:
    """Random replies, their shared states decoded as the strategy decodes them: into the rows of
    one round matrix (keys in sorted order), each tensor a view of its client's row."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = dict(sorted({f"pq.{k}.{module}.{part}": ((R, R) if part == "P" else (R,))
                        for k in range(BLOCKS) for module in MODULES for part in ("P", "Q")}.items()))
    width = sum(int(np.prod(shape)) for shape in spec.values())
    rows = torch.randn(n, width, generator=gen)
    updates = []
    for i in range(n):
        shared, offset = {}, 0
        for key, shape in spec.items():
            size = int(np.prod(shape))
            shared[key] = rows[i, offset : offset + size].view(shape)
            offset += size
        tv = rng.standard_normal(sketch_shape, dtype=np.float32)
        updates.append(ClientUpdate(f"client-{i}", "llama-3.2-1b", shared, {}, tv))
    return updates


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def big_matmul_rate(device: torch.device, repeats: int) -> float:
    """GFLOP/s of a large square fp32 matmul: the machine's practical peak."""
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def product() -> None:
        a @ b
        sync(device)

    product()
    return 2 * size**3 / best_time(product, repeats) / 1e9


def measure(
    n: int, sketch_shape: tuple[int, int], device: torch.device, repeats: int
) -> tuple[float, float, float, float, float]:
    """(aggregation wall seconds, FLOP floor, GFLOP/s of the same-shape plain matmuls with one
    reused operand, with a distinct operand per module as the aggregation reads, and with
    distinct operands and kept results as the aggregation returns them)."""
    updates = make_updates(n, sketch_shape, seed=n)
    d_sketch = sketch_shape[0] * sketch_shape[1]
    numel_total = BLOCKS * len(MODULES) * (R * R + R)
    floor = 2.0 * n * n * numel_total + 2.0 * n * n * d_sketch

    # as the strategy calls it: with the schemas the clients declared at the handshake
    expected_shared = {key: tuple(value.shape) for key, value in updates[0].shared.items()}
    expected_same_arch: dict[str, dict[str, tuple[int, ...]]] = {"llama-3.2-1b": {}}

    def run() -> None:
        result = aggregate_global_states(updates, {}, mode="fedmosaic", device=device,
                                         expected_shared=expected_shared, expected_same_arch=expected_same_arch)
        sync(device)
        assert not result.excluded and len(result.globals) == n

    run()  # warm-up
    wall = best_time(run, repeats)
    updates.clear()  # free the payload before the plain matmuls
    gc.collect()

    # the same-shape plain matmuls (mixing per parameter + the similarity Gram), this run
    w = torch.rand(n, n, device=device)
    modules = BLOCKS * len(MODULES)
    stacks_p = [torch.randn(n, R * R, device=device) for _ in range(modules)]
    stacks_q = [torch.randn(n, R, device=device) for _ in range(modules)]
    gram_in = torch.randn(n, d_sketch)

    def plain(distinct: bool, keep: bool = False) -> None:
        kept = []
        for k in range(modules):
            mixed_p = w @ stacks_p[k if distinct else 0]
            mixed_q = w @ stacks_q[k if distinct else 0]
            if keep:
                kept += [mixed_p, mixed_q]
        gram_in @ gram_in.T
        sync(device)

    plain(False)
    plain(True)
    plain(True, keep=True)
    reused = floor / best_time(lambda: plain(False), repeats) / 1e9
    distinct = floor / best_time(lambda: plain(True), repeats) / 1e9
    kept = floor / best_time(lambda: plain(True, keep=True), repeats) / 1e9
    return wall, floor, reused, distinct, kept


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    n: list[int] = typer.Option([10, 100, 1000], help="clients (repeat the option for several)"),
    device_name: str = typer.Option("cpu", "--device", help="torch device"),
    threads: int = typer.Option(1, help="torch threads"),
    repeats: int = typer.Option(3, help="timed repeats; the best is kept"),
) -> None:
    """Aggregation wall time against the FLOP floor, per number of clients."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)

    sketch = TaskVectorCompression.for_shape(round(0.4 * 2048), 8192, min_ratio=100)
    sketch_shape = sketch.compressed_shape(round(0.4 * 2048), 8192)
    d_sketch = sketch_shape[0] * sketch_shape[1]
    numel_param = R * R + R
    numel_total = BLOCKS * len(MODULES) * numel_param
    print(
        f"device={device} threads={threads}; per client: {BLOCKS * len(MODULES)} PQ modules × "
        f"(r²+r) = {numel_total} floats ({numel_total * 4 / 2**20:.1f} MiB), task-vector sketch "
        f"{sketch_shape} ({d_sketch * 4 / 2**10:.0f} KiB)"
    )
    header = (
        f"{'N':>5} {'wall s':>8} {'floor GFLOP':>11} {'GFLOP/s':>8} {'matmul GFLOP/s':>14} "
        f"{'ratio':>6} {'distinct GFLOP/s':>16} {'ratio':>6} {'kept GFLOP/s':>12} {'ratio':>6} "
        f"{'big-matmul GFLOP/s':>18} {'ratio':>6}"
    )
    peak_big = big_matmul_rate(device, repeats)
    print(header)
    for clients in n:
        wall, floor, rate_plain, rate_distinct, rate_kept = measure(clients, sketch_shape, device, repeats)
        rate = floor / wall / 1e9
        print(
            f"{clients:>5} {wall:>8.4f} {floor / 1e9:>11.2f} {rate:>8.1f} {rate_plain:>14.1f} "
            f"{rate / rate_plain:>6.2f} {rate_distinct:>16.1f} {rate / rate_distinct:>6.2f} "
            f"{rate_kept:>12.1f} {rate / rate_kept:>6.2f} {peak_big:>18.1f} {rate / peak_big:>6.2f}"
        )
        gc.collect()

if __name__ == "__main__":
    app()
