"""Scoring a client's model on one task's test samples (the run config's ``scoring`` key).

* ``likelihood`` (default): a multiple-choice sample is answered by the option with the highest
  ``log p(option </s> | prompt)`` (:mod:`fedmosaic_core.models.scoring`); score 1 if that is
  the gold option.
* ``generation``: greedy decoding, then the option the text names (:mod:`drake_data.answers`);
  a reply that names no option scores 0 and counts as *unparsable*. This is how the paper scores
  real models.

Open-ended samples (and multiple-choice ones without a parsable choice list) are always generated
and scored by token F1 / exact match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from drake_data.answers import chosen_index, gold_index, score_sample
from drake_data.prompts import RenderedSample
from fedmosaic_core.models.collate import generate_answers
from fedmosaic_core.models.scoring import choose_options

Scoring = Literal["likelihood", "generation"]
EVAL_BATCH = 16


@dataclass(frozen=True)
class TaskScore:
    """Mean score over a task's samples, with how many multiple-choice replies named no option."""

    score: float
    samples: int
    choice_samples: int
    unparsable: int


def score_samples(
    model: nn.Module,
    processor: Any,
    samples: Sequence[RenderedSample],
    *,
    scoring: Scoring,
    max_length: int,
    max_new_tokens: int,
) -> TaskScore:
    """Score ``samples`` with ``model`` (see the module docstring)."""
    if not samples:
        raise ValueError("no samples to score")
    total = 0.0
    unparsable = choice_samples = 0
    for start in range(0, len(samples), EVAL_BATCH):
        chunk = list(samples[start : start + EVAL_BATCH])
        ranked = [s for s in chunk if s.task_type == "multi-choice" and s.choices]
        if scoring == "likelihood" and ranked:
            picks = choose_options(model, processor, ranked, [s.choices or [] for s in ranked], max_length)
            total += sum(float(k == gold_index(s)) for k, s in zip(picks, ranked, strict=True))
            choice_samples += len(ranked)
            chunk = [s for s in chunk if not (s.task_type == "multi-choice" and s.choices)]
        if not chunk:
            continue
        answers = generate_answers(model, processor, chunk, max_new_tokens=max_new_tokens, max_length=max_length)
        for text, sample in zip(answers, chunk, strict=True):
            total += score_sample(text, sample)
            if sample.task_type == "multi-choice" and sample.choices:
                choice_samples += 1
                unparsable += chosen_index(text, sample.choices) is None
    return TaskScore(total / len(samples), len(samples), choice_samples, unparsable)
