"""PQ-LoRA (both branches + gate) vs peft LoRA of the same rank: train-step time and peak memory.

One Llama-shaped model (default: hidden 512, 8 layers, batch 4 × 128 tokens, fp32), r = d/16,
alpha = 2r, dropout 0.05, adapters on all 7 LM linears (4 PQ layers + 4 dual-LoRA layers for
PQ-LoRA). A train step is forward + backward + AdamW step + zero_grad.

Time: both models live in this process (same base weights) and their steps are interleaved,
so machine load affects both alike; the ratio of the medians is printed.
Memory: each variant runs in its own fresh subprocess. CPU: glibc is told to serve every block
≥ 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS at once; after
building model + optimiser the peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and the
peak (``VmHWM``) over the train steps is read; reported: the peak over the whole process and
the growth above the post-build baseline (activations, gradients, optimiser state). CUDA:
``torch.cuda.max_memory_allocated`` with the same baseline.

    python bench/bench_pqlora.py [--device cuda] [--layers 8] [--hidden 512] [--steps 10]
    python bench/bench_pqlora.py --model smollm2-135m     # the real pretrained SmolLM2-135M-Instruct
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import typer
from transformers import LlamaConfig, LlamaForCausalLM

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("pqlora", "peft")
TIME_TARGET, MEMORY_TARGET = 1.25, 1.10


@dataclass
class BenchArgs:
    device: str
    hidden: int
    layers: int
    vocab: int
    seq: int
    batch: int
    dropout: float
    steps: int
    warmup: int
    memory_steps: int
    threads: int
    model: str


def base_model(args: BenchArgs) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if args.model:  # a real pretrained checkpoint, e.g. smollm2-135m (fp32, CPU)
        from fedmosaic_core.models.loading import load_model

        model = load_model(args.model).model
        if not isinstance(model, LlamaForCausalLM):
            raise SystemExit(f"--model {args.model}: a Llama-architecture causal LM is needed here")
        return model
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, max_position_embeddings=max(512, args.seq),
    )
    return LlamaForCausalLM(cfg)


def adapt(model: LlamaForCausalLM, variant: str, args: BenchArgs) -> torch.nn.Module:
    r = args.hidden // 16
    if variant == "pqlora":
        from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

        return inject_pqlora(
            model, PQLoRAConfig(r=r, alpha=2 * r, dropout=args.dropout, target_modules=tuple(MODULES))
        )
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=MODULES)
    )


class Trainer:
    def __init__(self, model: torch.nn.Module, device: torch.device, args: BenchArgs):
        self.model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        self.device = device

    def step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(variant: str, args: BenchArgs) -> dict[str, Any]:
    import peft  # noqa: F401  (both libraries loaded in both workers: same import baseline)

    import fedmosaic_core.pqlora  # noqa: F401

    device = torch.device(args.device)
    imports = torch.cuda.memory_allocated() if device.type == "cuda" else proc_status_kib("VmRSS") * 1024
    trainer = Trainer(adapt(base_model(args), variant, args), device, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.memory_steps):
            trainer.step()
        peak = torch.cuda.max_memory_allocated()
        return {"variant": variant, "imports_mib": imports / 2**20, "baseline_mib": baseline / 2**20,
                "peak_mib": peak / 2**20}
    baseline = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    for _ in range(args.memory_steps):
        trainer.step()
    peak = proc_status_kib("VmHWM")
    return {"variant": variant, "imports_mib": imports / 2**20, "baseline_mib": baseline / 1024,
            "peak_mib": peak / 1024}


def measure_memory(variant: str, argv: list[str]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-worker", variant],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    device: str = typer.Option("cpu", help="cpu or cuda"),
    hidden: int = typer.Option(512, help="hidden size of the random Llama"),
    layers: int = typer.Option(8, help="decoder layers of the random Llama"),
    vocab: int = typer.Option(2048, help="vocabulary of the random Llama"),
    seq: int = typer.Option(128, help="tokens per sample"),
    batch: int = typer.Option(4, help="samples per step"),
    dropout: float = typer.Option(0.05, help="adapter dropout"),
    steps: int = typer.Option(10, help="timed steps per variant"),
    warmup: int = typer.Option(2, help="untimed steps first"),
    memory_steps: int = typer.Option(3, help="steps in each memory subprocess"),
    threads: int = typer.Option(1, help="torch threads"),
    model: str = typer.Option("", help="a real Llama-architecture model instead of a random one (e.g. "
                              "smollm2-135m); --hidden, --layers and --vocab are then read from it"),
    memory_worker_variant: str = typer.Option("", "--memory-worker", hidden=True),
) -> None:
    """PQ-LoRA vs peft LoRA of the same rank: train-step time and peak memory."""
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter(f"--device must be cpu or cuda, got {device!r}")
    if memory_worker_variant and memory_worker_variant not in VARIANTS:
        raise typer.BadParameter(f"--memory-worker must be one of {VARIANTS}, got {memory_worker_variant!r}")
    args = BenchArgs(device, hidden, layers, vocab, seq, batch, dropout, steps, warmup, memory_steps, threads, model)
    if args.model:
        from fedmosaic_core.models.loading import load_model

        config = load_model(args.model).model.config
        args.hidden, args.layers, args.vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    torch.set_num_threads(args.threads)
    if memory_worker_variant:
        print(json.dumps(memory_worker(memory_worker_variant, args)))
        return
    shared_base = base_model(args)
    trainers = {v: Trainer(adapt(copy.deepcopy(shared_base), v, args), torch.device(args.device), args) for v in VARIANTS}
    del shared_base
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.steps):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for v in order:
            elapsed = trainers[v].step()
            if i >= args.warmup:
                times[v].append(elapsed)
    trainable = {v: trainers[v].trainable for v in VARIANTS}
    del trainers

    memory = {v: measure_memory(v, sys.argv[1:]) for v in VARIANTS}

    r = args.hidden // 16
    print(
        f"{args.model or 'random Llama'} hidden={args.hidden} layers={args.layers} vocab={args.vocab} batch={args.batch}×"
        f"{args.seq} r={r} dropout={args.dropout} device={args.device} threads={args.threads}"
    )
    job = {v: memory[v]["peak_mib"] - memory[v]["imports_mib"] for v in VARIANTS}
    growth = {v: memory[v]["peak_mib"] - memory[v]["baseline_mib"] for v in VARIANTS}
    print(
        f"{'variant':8} {'trainable':>10} {'step s (median)':>16} {'peak MiB':>9} "
        f"{'model+train MiB':>16} {'train MiB':>10}"
    )
    for v in VARIANTS:
        print(
            f"{v:8} {trainable[v]:>10,} {statistics.median(times[v]):>16.4f} "
            f"{memory[v]['peak_mib']:>9.1f} {job[v]:>16.1f} {growth[v]:>10.1f}"
        )
    t_ratio = statistics.median(times["pqlora"]) / statistics.median(times["peft"])
    print(f"time ratio (PQ-LoRA / peft LoRA):                 {t_ratio:.3f}  (target ≤ {TIME_TARGET})")
    print(
        f"peak memory ratio (model + training, above imports): {job['pqlora'] / job['peft']:.3f}"
        f"  (target ≤ {MEMORY_TARGET})"
    )
    print(f"peak memory ratio (whole process):                {memory['pqlora']['peak_mib'] / memory['peft']['peak_mib']:.3f}")
    print(f"training growth ratio (above the built model):    {growth['pqlora'] / growth['peft']:.3f}")


if __name__ == "__main__":
    app()
