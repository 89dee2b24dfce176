"""Tiny presets: train-step time, preparation (time, held-out before/after) and A/B alignment.

``python bench/bench_models.py --public-data DIR [--cache-dir DIR] [--threads 1] [--r 16]
[--out results.json]``

1. Train-step time per preset (all weights, AdamW) at batch 8 × 64 tokens with one 32×32 image
   per sample (docs/method.md, "Offline models" budget: about 0.1 s on 2 cores).
2. ``prepare_presets`` on DRAKE-mini's public split (fresh cache unless ``--cache-dir`` already
   holds them): wall time for all presets and each preset's held-out answer loss / exact-match
   accuracy before and after pretraining.
3. A/B alignment of tiny-llama-m (same family) and tiny-qwen2-s (cross family) to the anchor
   tiny-llama-s, on the prepared models: held-out mean cosine and linear CKA of the r-dim latents
   before/after, max ‖AAᵀ − I‖, token-matching error, seconds.

The machine's 1-minute load average is printed before and after: figures taken while other
processes use the cores are slower than on a quiet machine.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import typer

from drake_data.prompts import RenderedSample
from fedmosaic_core.models import PRESETS, collate, load_model
from fedmosaic_core.models.align import AlignConfig, align_bases
from fedmosaic_core.models.presets import build_preset
from fedmosaic_core.models.pretrain import prepare_presets
from fedmosaic_flower.prepare import DrakePublicSplit


def step_time(name: str, samples: list, steps: int = 10) -> float:  # type: ignore[type-arg]
    model, processor = build_preset(name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with_image = [s for s in samples if len(s.images) == 1][:8]
    batch = collate(processor, with_image, max_length=64)
    pad = 64 - batch["input_ids"].shape[1]  # exactly 64 tokens
    if pad > 0:
        for key, value in (("input_ids", processor.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", -100)):
            batch[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cross_tokenizer_matching_error(samples: list, processor: object, limit: int = 300) -> float:  # type: ignore[type-arg]
    """Mean DTW matching error (1 − IoU along the path) between the committed tokenizer and a
    600-token BPE trained on the same corpus: what cross-tokenizer alignment costs."""
    from transformers import PreTrainedTokenizerFast

    from fedmosaic_core.models.align import dtw_match, token_positions
    from fedmosaic_core.models.tokenizer_build import tokenizer_config, train_tokenizer

    fine = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(600), **tokenizer_config())
    coarse = processor.tokenizer  # type: ignore[attr-defined]
    errors = []
    for sample in samples[:limit]:
        texts = []
        for tok in (coarse, fine):
            _, positions = token_positions(tok, _text_only(sample), 0)
            texts.append([p for p in positions if p.kind == "text"])
        errors.append(dtw_match(texts[0], texts[1])[1])
    return sum(errors) / len(errors)


def _text_only(sample: RenderedSample) -> RenderedSample:
    return RenderedSample(sample.id, sample.prompt.replace("<image>", ""), sample.answer, [],
                          sample.choices, sample.task_type)


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    public_data: Path = typer.Option(..., help="DRAKE-mini's public split folder"),
    cache_dir: Path | None = typer.Option(None, help="prepared presets (a fresh temp folder if omitted)"),
    threads: int = typer.Option(1, help="torch threads"),
    r: int = typer.Option(16, help="the alignment's rank"),
    out: Path | None = typer.Option(None, help="write the results as JSON here"),
) -> None:
    """Tiny presets: train-step time, preparation and A/B alignment."""
    torch.set_num_threads(threads)
    results: dict[str, object] = {"threads": threads, "load_before": os.getloadavg()[0]}

    public = DrakePublicSplit(public_data)
    samples = public.samples()
    step_seconds = {name: step_time(name, samples) for name in PRESETS}
    results["step_seconds_b8_t64"] = step_seconds
    print("train step (batch 8 × 64 tokens, 1 image):", {k: f"{v:.3f} s" for k, v in step_seconds.items()})

    cache = cache_dir or Path(tempfile.mkdtemp(prefix="fedmosaic-bench-"))
    start = time.perf_counter()
    prepared = prepare_presets(public, cache, seed=0)
    results["prepare_total_seconds"] = time.perf_counter() - start
    results["prepare"] = {}
    for name, directory in prepared.items():
        record = json.loads((directory / "prepare.json").read_text())
        results["prepare"][name] = {  # type: ignore[index]
            k: record[k] for k in ("before", "after", "train_seconds", "seconds_per_step", "num_train",
                                   "num_held_out", "num_parameters")
        }
        print(f"{name}: held-out answer loss {record['before']['held_out_answer_loss']:.2f} -> "
              f"{record['after']['held_out_answer_loss']:.2f}, accuracy "
              f"{record['before']['held_out_accuracy']:.2f} -> {record['after']['held_out_accuracy']:.2f}, "
              f"{record['train_seconds']:.1f} s training")
    print(f"prepare (all presets, incl. data loading and evaluation): {results['prepare_total_seconds']:.1f} s")

    anchor = load_model("tiny-llama-s", cache_dir=cache, public_split=public)
    results["alignment"] = {}
    for other_name in ("tiny-llama-m", "tiny-qwen2-s"):
        other = load_model(other_name, cache_dir=cache, public_split=public)
        bases = align_bases(anchor, other, samples, AlignConfig(r=r))
        m = bases.metrics
        keep = ("cosine_before", "cosine_after", "cka_before", "cka_after", "max_orthonormality_error_A",
                "token_matching_error_held_out", "cca_mean_correlation", "fit_positions",
                "held_out_positions", "seconds", "b_transfer_seeded", "b_transfer_cca_raw",
                "b_transfer_after", "cca_raw_b_max_singular")
        results["alignment"][other_name] = {k: m[k] for k in keep}  # type: ignore[index]
        print(f"align {other_name} -> tiny-llama-s (r={r}): latent cosine {m['cosine_before']:.3f} -> "
              f"{m['cosine_after']:.3f}, CKA {m['cka_before']:.3f} -> {m['cka_after']:.3f}, "
              f"max ||AA^T - I|| {m['max_orthonormality_error_A']:.1e}, token matching error "
              f"{m['token_matching_error_held_out']:.3f}, {m['seconds']:.1f} s; B transfer cosine "
              f"seeded {m['b_transfer_seeded']:.3f} / raw CCA {m['b_transfer_cca_raw']:.3f} / "
              f"orthonormalised {m['b_transfer_after']:.3f} (raw CCA B max singular value "
              f"{m['cca_raw_b_max_singular']:.0f})")
    results["dtw_error_vs_600_vocab_tokenizer"] = cross_tokenizer_matching_error(samples, anchor.processor)
    print("DTW token-matching error, committed tokenizer vs a 600-vocab BPE on the public split: "
          f"{results['dtw_error_vs_600_vocab_tokenizer']:.3f} (mean 1 - IoU of matched char spans)")
    results["load_after"] = os.getloadavg()[0]
    print(f"1-min load average: {results['load_before']:.2f} before, {results['load_after']:.2f} after")
    if out:
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app()
