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

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedmosaic_core.modeling import IGNORE_INDEX
from fedmosaic_core.pqlora.model import branch_logit_sum, gate_pooling, select_decoding_rows

from .collate import SampleLike, collate, image_token_count, pixel_values_for, tokenize_sample


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

    def forward() -> torch.Tensor:
        # PQ-LoRA gates pool over the prompt only, also where the decoder is called directly.
        with gate_pooling(model, batch.get("attention_mask"), batch["labels"]):
            if lm is None or getattr(text_config, "final_logit_softcapping", None):
                return model(**inputs).logits[:, :-1][keep]
            return lm.lm_head(lm.model(**inputs).last_hidden_state[:, :-1][keep])

    return branch_logit_sum(model, forward).float(), targets[keep], rows



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
    questions_per_batch: int = 16,
) -> list[list[float]]:
    """``log p(option </s> | prompt)`` for every option of every sample (same order as ``choices``).

    Each prompt (images included) goes through the model once; its key/value cache is then
    repeated for the prompt's options, which are scored in one more forward. This gives the
    values of one full forward per (prompt, option) row: the same positions, the same attention,
    and PQ-LoRA gates that keep each prompt's β (they pool over the prompt only either way).
    Models without a separate decoder and head are scored one full row per option.
    """
    if len(samples) != len(choices):
        raise ValueError(f"{len(samples)} samples but {len(choices)} choice lists")
    lm = _causal_lm(model)
    text_config = lm.config.get_text_config() if lm is not None and hasattr(lm.config, "get_text_config") else None
    shared_prompt = lm is not None and not getattr(text_config, "final_logit_softcapping", None)
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples), questions_per_batch):
            chunk = list(samples[start : start + questions_per_batch])
            options = [list(c) for c in choices[start : start + questions_per_batch]]
            scorer = _prompt_then_options if shared_prompt else _one_row_per_option
            out.extend(scorer(model, processor, chunk, options, max_length))
    finally:
        model.train(was_training)
    return out


def _option_rows(samples: Sequence[SampleLike], choices: Sequence[Sequence[str]]) -> list[_OptionSample]:
    return [_OptionSample(s.id, s.prompt, option, list(s.images))
            for s, options in zip(samples, choices, strict=True) for option in options]


def _regroup(values: Sequence[float], choices: Sequence[Sequence[str]]) -> list[list[float]]:
    out, start = [], 0
    for options in choices:
        out.append([float(v) for v in values[start : start + len(options)]])
        start += len(options)
    return out


def _to_model(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    moved = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def _one_row_per_option(
    model: nn.Module, processor: Any, samples: Sequence[SampleLike], choices: Sequence[Sequence[str]], max_length: int
) -> list[list[float]]:
    batch = _to_model(collate(processor, _option_rows(samples, choices), max_length), model)
    return _regroup(_row_log_likelihoods(model, batch).tolist(), choices)


def _prompt_then_options(
    model: nn.Module, processor: Any, samples: Sequence[SampleLike], choices: Sequence[Sequence[str]], max_length: int
) -> list[list[float]]:
    """One forward over the prompts (with cache), one over every option (:func:`option_log_likelihoods`)."""
    lm = _causal_lm(model)
    rows = _option_rows(samples, choices)
    if not rows:
        return [[] for _ in samples]
    pad = getattr(getattr(processor, "tokenizer", processor), "pad_token_id", None) or 0
    pixel_values = pixel_values_for(processor, samples)
    per_image = image_token_count(processor, pixel_values) if pixel_values is not None else 0
    # the length check of every (prompt, option) row, exactly as training batches make it
    tokenized = [tokenize_sample(processor, row, max_length, with_answer=True, tokens_per_image=per_image)
                 for row in rows]
    prompts = [tokenize_sample(processor, s, max_length, with_answer=False, tokens_per_image=per_image).input_ids
               for s in samples]
    owner = torch.tensor([q for q, options in enumerate(choices) for _ in options])  # row → its prompt
    answers = [t.input_ids[t.num_prompt_tokens :] for t in tokenized]
    prompt_ids, prompt_mask_ = _right_padded(prompts, pad)
    answer_ids, answer_mask = _right_padded(answers, pad)
    lengths = prompt_mask_.sum(dim=1)
    inputs = _to_model({"input_ids": prompt_ids, "attention_mask": prompt_mask_}
                       | ({"pixel_values": pixel_values} if pixel_values is not None else {}), model)
    device = inputs["input_ids"].device
    owner, lengths = owner.to(device), lengths.to(device)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    full_mask = torch.cat([inputs["attention_mask"][owner], answer_mask], dim=1)
    positions = lengths[owner, None] + torch.arange(answer_ids.shape[1], device=device)
    keep = answer_mask.bool()

    def forward() -> torch.Tensor:
        with gate_pooling(model, inputs["attention_mask"]):
            prompt_out = lm.model(**inputs, use_cache=True)
        cache = prompt_out["cache"] if "cache" in prompt_out else prompt_out.past_key_values
        last_hidden = prompt_out.last_hidden_state[torch.arange(len(samples), device=device), lengths - 1]
        cache.batch_select_indices(owner)
        select_decoding_rows(model, owner)
        with gate_pooling(model, full_mask):
            answer_hidden = lm.model(input_ids=answer_ids, attention_mask=full_mask, position_ids=positions,
                                     use_cache=True, **{_cache_argument(lm.model): cache}).last_hidden_state
        # answer token t is predicted at answer position t-1, the first one at the prompt's last token
        predicting = torch.cat([last_hidden[owner, None], answer_hidden[:, :-1]], dim=1)
        return lm.lm_head(predicting[keep])

    logits = branch_logit_sum(model, forward).float()
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, answer_ids[keep].unsqueeze(-1)).squeeze(-1)
    row_of = torch.arange(len(rows), device=device)[:, None].expand_as(answer_ids)[keep]
    totals = torch.zeros(len(rows), dtype=token_logp.dtype, device=device).index_add(0, row_of, token_logp)
    return _regroup(totals.tolist(), choices)


def _cache_argument(decoder: nn.Module) -> str:
    """``cache`` (transformers ≥ 5.24) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _right_padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


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
