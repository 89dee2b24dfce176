"""Multiple choice by option likelihood (rank classification, as lm-evaluation-harness does).

For a prompt ``x`` with options ``o_1 … o_K`` the model's choice is

    k* = argmax_k  log p(o_k </s> | x) = Σ_t log p(y_t | x, y_<t),

summed over the option's answer tokens *and the closing eos*, in the chat template the model is
trained with (:mod:`.collate`). That is the log-probability that the model's whole reply is
``o_k``. It is not length-normalised (lm-evaluation-harness's ``acc``, not ``acc_norm``):
fine-tuning targets are exactly these replies, so their probability is the quantity the model is
trained on, and DRAKE-style options are one to three tokens long, where per-token or per-byte
normalisation would mainly favour options that split into more, individually likely, tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmosaic_core.modeling import IGNORE_INDEX
from fedmosaic_core.pqlora.model import gate_pooling

from .collate import SampleLike, collate


@dataclass(frozen=True)
class _OptionSample:
    """A sample whose answer is one candidate option (what collate needs)."""

    id: str
    prompt: str
    answer: str
    images: list[Any]


def _causal_lm(model: nn.Module) -> Any:
    """The Hugging Face ``*ForCausalLM`` / ``*ForConditionalGeneration`` inside ``model`` (a
    PQLoRAModel or peft wrapper forwards to it), or ``None``."""
    current: Any = model
    for _ in range(4):
        if hasattr(current, "lm_head") and hasattr(current, "model") and hasattr(current, "config"):
            return current
        current = getattr(current, "base_model", None) or getattr(current, "model", None)
        if current is None:
            return None
    return None


def answer_token_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label, their targets and their batch rows.

    ``batch`` is :func:`collate`'s (``labels`` = IGNORE_INDEX off the answer). Position t-1
    predicts token t. Only those positions go through the output head (a few answer tokens of
    a long prompt; the head over the whole sequence is most of a tiny model's cost), which
    gives the same values as the full forward's logits there.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    lm = _causal_lm(model)
    text_config = lm.config.get_text_config() if lm is not None and hasattr(lm.config, "get_text_config") else None
    # PQ-LoRA gates pool over the prompt only, also where the decoder is called directly.
    with gate_pooling(model, batch.get("attention_mask"), batch["labels"]):
        if lm is None or getattr(text_config, "final_logit_softcapping", None):
            logits = model(**inputs).logits[:, :-1][keep]
        else:
            hidden = lm.model(**inputs).last_hidden_state[:, :-1][keep]
            logits = lm.lm_head(hidden)
    return logits.float(), targets[keep], rows


def answer_loss_mean(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (what ``model(**batch).loss`` computes)."""
    logits, targets, _ = answer_token_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets)


def answer_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: Σ_t log softmax(logits[t-1])[labels[t]] over positions with a label.

    ``logits`` (rows, length, vocab) and ``labels`` (rows, length, IGNORE_INDEX off the answer)
    as a causal LM's forward and :func:`collate` give them; the shift by one is done here.
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logp = torch.log_softmax(shifted, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(dim=1)


def _row_log_likelihoods(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, targets, rows = answer_token_logits(model, batch)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(batch["labels"].shape[0], dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add(0, rows, token_logp)


@torch.no_grad()
def option_log_likelihoods(
    model: nn.Module,
    processor: Any,
    samples: Sequence[SampleLike],
    choices: Sequence[Sequence[str]],
    max_length: int,
    rows_per_batch: int = 48,
) -> list[list[float]]:
    """``log p(option </s> | prompt)`` for every option of every sample (same order as ``choices``)."""
    if len(samples) != len(choices):
        raise ValueError(f"{len(samples)} samples but {len(choices)} choice lists")
    rows = [
        (i, _OptionSample(s.id, s.prompt, option, list(s.images)))
        for i, (s, options) in enumerate(zip(samples, choices, strict=True))
        for option in options
    ]
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out: list[list[float]] = [[] for _ in samples]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), rows_per_batch):
            chunk = rows[start : start + rows_per_batch]
            batch = collate(processor, [row for _, row in chunk], max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            scores = _row_log_likelihoods(model, batch)
            for (i, _), value in zip(chunk, scores.tolist(), strict=True):
                out[i].append(float(value))
    finally:
        model.train(was_training)
    return out


def ranked_choice(log_likelihoods: Sequence[float]) -> int:
    """Index of the most likely option (the first one on an exact tie)."""
    if not log_likelihoods:
        raise ValueError("no options to choose from")
    return int(torch.tensor(list(log_likelihoods)).argmax())


def choose_options(
    model: nn.Module,
    processor: Any,
    samples: Sequence[SampleLike],
    choices: Sequence[Sequence[str]],
    max_length: int,
) -> list[int]:
    """The option each sample's prompt makes most likely (see the module docstring)."""
    return [ranked_choice(ll) for ll in option_log_likelihoods(model, processor, samples, choices, max_length)]


__all__ = ["answer_log_likelihoods", "answer_loss_mean", "answer_token_logits", "choose_options",
           "option_log_likelihoods", "ranked_choice"]
