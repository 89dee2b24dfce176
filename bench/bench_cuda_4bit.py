"""PQ-LoRA on 4-bit (NF4) bases of 1-3B shapes on a GPU: the product's load path, correctness
checks and train-step time and memory against peft LoRA and bf16 bases.

Each shape is a public model's architecture (Llama-3.2-1B, Llama-3.2-3B, Qwen2.5-1.5B) built
from its config with random weights: speed and memory do not depend on the weights' values, and
no weights can be downloaded here. The random bf16 checkpoint is saved to a folder and loaded
through ``fedmosaic_core.models.loading.load_model(folder, quantization="nf4")``, as a user's
local checkpoint is: quantised at the first load and kept, then reloaded pre-quantised.

Checks (each fails the run): PQ-LoRA at init leaves the 4-bit model's logits unchanged; with a
non-zero global branch they are finite and move; "evaluate, then train" gives finite, non-zero
gradients to every local P/Q, gate and LoRA tensor, the first PQ layer's P included;
``merge_and_unload(dequantize=True)`` matches the unmerged model.

Timing: a train step (forward + backward + AdamW + zero_grad) on ``--batch`` × ``--seq`` random
tokens, median of ``--steps`` after ``--warmup``, for PQ-LoRA and peft LoRA (same rank, the same
7 target modules) on the NF4 base and on the bf16 base, and for PQ-LoRA on NF4 with activation
checkpointing (the run config's ``gradient-checkpointing``). Memory (CUDA): the base's allocated
bytes after loading, and the peak over the train steps above the allocation once model and
optimiser exist (activations, gradients, AdamW state); on CPU the same from the resident set
(``VmHWM`` after resetting it, glibc told to return freed blocks at once). Also: one RELA probe gradient
(``TaskVectorProbe``) and a 6-token greedy generation.

    python bench/bench_cuda_4bit.py --device cuda --shape llama-3.2-1b --shape llama-3.2-3b \\
        --shape qwen2.5-1.5b --out results.jsonl
    python bench/bench_cuda_4bit.py --device cpu --shape tiny     # the same checks, on CPU
    python bench/bench_cuda_4bit.py --device cpu --shape small --batch 8 --seq 256 --steps 3 --warmup 1
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import typer
from bench_pqlora import proc_status_kib, sync  # bench/ is the script's folder, first on sys.path
from torch import nn

from fedmosaic_core.models.loading import load_model
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora
from fedmosaic_core.rela.probe import TaskVectorProbe

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Architectures of public checkpoints (their config.json values), random weights.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   head_dim=64, tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-3.2-3b": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                   num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                                   head_dim=128, tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "tiny": ("llama", dict(vocab_size=2048, hidden_size=128, intermediate_size=352,
                           num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)),
    "small": ("llama", dict(vocab_size=2048, hidden_size=512, intermediate_size=1408,
                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)),
    "tiny-qwen2": ("qwen2", dict(vocab_size=2048, hidden_size=128, intermediate_size=352,
                                 num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=1)),
}


def _proc_status_mib(field: str) -> float:
    return proc_status_kib(field) / 1024


def allocated(device: torch.device) -> float:
    """MiB in use: CUDA's allocated bytes, or the process's resident set on CPU."""
    return torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else _proc_status_mib("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # the peak resident set (VmHWM) starts again from the current one
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _proc_status_mib("VmHWM")


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save_random_checkpoint(shape: str, folder: Path, device: torch.device) -> None:
    """The shape's architecture with seeded random weights, saved in bf16 with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from fedmosaic_core.models.tokenizer import load_tiny_tokenizer

    family, values = SHAPES[shape]
    config = (LlamaConfig if family == "llama" else Qwen2Config)(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    load_tiny_tokenizer().save_pretrained(str(folder))  # ids are random here; any tokenizer loads
    del model
    free(device)


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half carries no loss, as in the product's batches
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def adapt(model: nn.Module, variant: str, r: int) -> nn.Module:
    if variant == "pqlora":
        return inject_pqlora(model, PQLoRAConfig(r=r, alpha=2 * r, dropout=0.05, target_modules=tuple(MODULES)))
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=MODULES))


def optimiser(model: nn.Module, variant: str) -> torch.optim.Optimizer:
    if variant == "pqlora":  # the product's groups: P/Q and gates at lr-pq, LoRA at lr-lora
        groups = model.parameter_groups()  # type: ignore[operator]
        lrs = {"pq": 1e-2, "gate": 1e-2, "lora": 1e-3}
        return torch.optim.AdamW([{"params": groups[g], "lr": lr} for g, lr in lrs.items() if groups[g]],
                                 weight_decay=0.0)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], n: int,
                device: torch.device) -> list[float]:
    times = []
    model.train()
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def check_pqlora_on_4bit(model: nn.Module, batch: dict[str, torch.Tensor], r: int) -> tuple[nn.Module, dict[str, Any]]:
    """The correctness checks of the module docstring; returns the wrapped model and figures."""
    import bitsandbytes as bnb

    quantised = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if quantised == 0:
        raise SystemExit("no bnb.nn.Linear4bit in the model loaded with quantization='nf4'")
    model.eval()
    with torch.no_grad():  # evaluate first (the AVX512-BF16 trap on CPU), then inject and train
        base_logits = model(**batch).logits.float()
    wrapped = inject_pqlora(model, PQLoRAConfig(r=r, alpha=2 * r, dropout=0.05, target_modules=tuple(MODULES)))
    kinds = sorted({item.adapter.base_kind for item in wrapped.adapted_modules})
    wrapped.eval()
    with torch.no_grad():
        init_logits = wrapped(**batch).logits.float()
    init_change = float((init_logits - base_logits).abs().max())
    if init_change != 0.0:
        raise SystemExit(f"PQ-LoRA at init changed the 4-bit model's logits by {init_change}")
    torch.manual_seed(2)
    wrapped.load_global_state(shared={k: torch.randn_like(v) * 0.05 for k, v in wrapped.shared_state().items()})
    with torch.no_grad():
        moved = wrapped(**batch).logits.float()
    if not torch.isfinite(moved).all() or float((moved - base_logits).abs().max()) == 0.0:
        raise SystemExit("a non-zero global branch gave non-finite or unchanged logits")
    wrapped.train()
    wrapped(**batch).loss.backward()
    groups = wrapped.parameter_groups()
    bad = [name for name in ("pq", "gate", "lora") for p in groups[name]
           if p.grad is None or not torch.isfinite(p.grad).all()]
    zero_p = [p for p in groups["pq"] if p.ndim == 2 and p.grad is not None and float(p.grad.abs().sum()) == 0.0]
    first_p = next(i.adapter for i in wrapped.adapted_modules if hasattr(i.adapter, "pq_P")).pq_P["local"]
    if bad or zero_p or first_p.grad is None or float(first_p.grad.abs().sum()) == 0.0:
        raise SystemExit(f"gradients missing or zero after evaluate-then-train: {len(bad)} missing, "
                         f"{len(zero_p)} zero P")
    wrapped.zero_grad(set_to_none=True)
    return wrapped, {"linear4bit": quantised, "base_kinds": kinds, "init_max_logit_change": init_change,
                     "global_max_logit_change": float((moved - base_logits).abs().max())}


def merge_error(wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    wrapped.load_local_state(shared={k: torch.randn_like(v) * 0.05 for k, v in wrapped.shared_state().items()})  # type: ignore[operator]
    wrapped.set_fixed_beta(0.5)  # type: ignore[operator]
    wrapped.eval()
    with torch.no_grad():
        unmerged = wrapped(**batch).logits.float()
        merged = wrapped.merge_and_unload(beta=0.5, dequantize=True)(**batch).logits.float()  # type: ignore[operator]
    return float((merged - unmerged).norm() / unmerged.norm())


def bench_shape(shape: str, device: torch.device, work: Path, r: int, batch_size: int, seq: int,
                steps: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": shape, "device": device.type, "r": r, "batch": batch_size, "seq": seq}
    folder, cache = work / shape, work / "cache"
    start = time.perf_counter()
    save_random_checkpoint(shape, folder, device)
    out["build_and_save_s"] = time.perf_counter() - start
    vocab = SHAPES[shape][1]["vocab_size"]
    batch = random_batch(vocab, batch_size, seq, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    for attempt in ("first", "again"):  # quantise and keep a copy; then reload the copy
        free(device)
        before = allocated(device)
        start = time.perf_counter()
        loaded = load_model(folder, quantization="nf4", dtype=dtype, device=device, cache_dir=cache)
        sync(device)
        out[f"load_nf4_{attempt}_s"] = time.perf_counter() - start
        out["base_nf4_mib"] = allocated(device) - before
        if attempt == "first":
            del loaded
    wrapped, checks = check_pqlora_on_4bit(loaded.model, batch, r)
    out.update(checks)
    out["merge_rel_error"] = merge_error(wrapped, batch)
    del wrapped, loaded
    free(device)

    loaded = load_model(folder, quantization="nf4", dtype=dtype, device=device, cache_dir=cache)
    probe = TaskVectorProbe(loaded.model)
    probe.gradient(batch)
    sync(device)
    start = time.perf_counter()
    grad = probe.gradient(batch)
    sync(device)
    out["probe_s"] = time.perf_counter() - start
    out["probe_grad_finite"] = bool(torch.isfinite(grad).all())
    del probe, grad, loaded
    free(device)

    runs = [("nf4", "pqlora", False), ("nf4", "peft", False), ("none", "pqlora", False),
            ("none", "peft", False), ("nf4", "pqlora", True)]
    for quant, variant, checkpointing in runs:
        free(device)
        before = allocated(device)
        loaded = load_model(folder, quantization=quant, dtype=dtype, device=device, cache_dir=cache)
        base_mib = allocated(device) - before
        model = adapt(loaded.model, variant, r)
        if checkpointing:  # the run config's gradient-checkpointing = true
            model.enable_activation_checkpointing()  # type: ignore[operator]
        opt = optimiser(model, variant)
        trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
        train_steps(model, opt, batch, warmup, device)
        free(device)
        reset_peak(device)
        baseline = allocated(device)
        times = train_steps(model, opt, batch, steps, device)
        top = peak(device)
        key = f"{variant}_{quant}" + ("_checkpointing" if checkpointing else "")
        out[key] = {"step_s": statistics.median(times), "trainable": trainable, "base_mib": base_mib,
                    "train_peak_above_model_mib": top - baseline}
        if variant == "pqlora" and quant == "nf4" and not checkpointing:
            model.eval()
            prompt = {k: v[:, : seq // 2] for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=6, do_sample=False)
                sync(device)
                start = time.perf_counter()
                model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
                sync(device)
            out["generate_6_tokens_s"] = time.perf_counter() - start
        del model, opt, loaded
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main(
    shape: list[str] = typer.Option(["tiny"], help=f"one of {sorted(SHAPES)}; repeat for several"),
    device: str = typer.Option("cuda", help="cuda, or cpu for the same checks on the CPU path"),
    r: int = typer.Option(16, help="PQ-LoRA rank (the run config's default) and peft's"),
    batch: int = typer.Option(4),
    seq: int = typer.Option(256),
    steps: int = typer.Option(10),
    warmup: int = typer.Option(3),
    out: Path = typer.Option(None, help="append one JSON line per shape"),
    work_dir: Path = typer.Option(None, help="folder for the random checkpoints (default: a temporary one)"),
) -> None:
    unknown = [s for s in shape if s not in SHAPES]
    if unknown:
        raise typer.BadParameter(f"unknown shape(s) {unknown}; expected {sorted(SHAPES)}", param_hint="--shape")
    torch_device = torch.device(device)
    if torch_device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        # glibc serves blocks ≥ 64 KiB with mmap, so freed tensors leave the resident set at once
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available", param_hint="--device")
    if torch_device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for name in shape:
            result = bench_shape(name, torch_device, Path(tmp), r, batch, seq, steps, warmup)
            print(json.dumps(result), flush=True)
            if out is not None:
                with out.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")
            summary(result)


def summary(res: dict[str, Any]) -> None:
    print(f"{res['shape']}: load NF4 first {res['load_nf4_first_s']:.1f} s, again {res['load_nf4_again_s']:.1f} s; "
          f"base NF4 {res['base_nf4_mib']:.0f} MiB vs bf16 {res['pqlora_none']['base_mib']:.0f} MiB; "
          f"merge rel. error {res['merge_rel_error']:.2e}; probe {res['probe_s'] * 1e3:.1f} ms; "
          f"generate 6 tokens {res['generate_6_tokens_s']:.2f} s")
    for quant in ("nf4", "none"):
        pq, peft = res[f"pqlora_{quant}"], res[f"peft_{quant}"]
        print(f"  {quant:4}: step PQ-LoRA {pq['step_s'] * 1e3:.1f} ms / peft {peft['step_s'] * 1e3:.1f} ms "
              f"= {pq['step_s'] / peft['step_s']:.2f}; train memory {pq['train_peak_above_model_mib']:.0f} / "
              f"{peft['train_peak_above_model_mib']:.0f} MiB; trainable {pq['trainable']:,} / {peft['trainable']:,}")
    ckpt = res["pqlora_nf4_checkpointing"]
    print(f"  nf4 PQ-LoRA with gradient-checkpointing: step {ckpt['step_s'] * 1e3:.1f} ms "
          f"({ckpt['step_s'] / res['pqlora_nf4']['step_s']:.2f}× without), train memory "
          f"{ckpt['train_peak_above_model_mib']:.0f} MiB ({ckpt['train_peak_above_model_mib'] / res['pqlora_nf4']['train_peak_above_model_mib']:.2f}× without)")


if __name__ == "__main__":
    typer.run(main)
