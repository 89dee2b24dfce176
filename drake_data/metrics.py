"""Benchmark metrics (docs/method.md, "DRAKE"), pure python/numpy. Scores are percentages in [0, 100].

- task score: mean of per-sample scores (accuracy for multi-choice, token F1 for open-ended) × 100.
- Self = mean over clients i of the mean over i's own tasks of s_i(t).
- Others = mean over clients i of the mean over the other clients' tasks of s_i(t).
- A_last = the mean task score after the final round.
- A_AUC = (1/R) Σ_r mean_{t started by round r} s_r(t): the area under the per-round accuracy
  curve (unit step, normalised by the number of rounds R), where each round averages only the
  tasks whose data has begun to arrive.
- unseen score = mean over the unseen tasks of s_i(t), per client, then over clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from drake_data.answers import score_sample
from drake_data.errors import DrakeDataError
from drake_data.prompts import RenderedSample


def task_score(sample_scores: Sequence[float]) -> float:
    """Mean per-sample score × 100."""
    if len(sample_scores) == 0:
        raise DrakeDataError("task_score of an empty task")
    return 100.0 * float(np.mean(np.asarray(sample_scores, dtype=np.float64)))


def evaluate_task(generated: Sequence[str], samples: Sequence[RenderedSample]) -> float:
    """Score a task's generations against its samples (same order)."""
    if len(generated) != len(samples):
        raise DrakeDataError(f"{len(generated)} generations for {len(samples)} samples")
    return task_score([score_sample(g, s) for g, s in zip(generated, samples, strict=True)])


@dataclass(frozen=True)
class SelfOthers:
    self_score: float
    others_score: float
    per_client_self: dict[int, float]
    per_client_others: dict[int, float]


def self_others(scores: Mapping[int, Mapping[str, float]], owner: Mapping[str, int]) -> SelfOthers:
    """``scores[i][t]``: client i's model on task t. ``owner[t]``: the client that trains on t.
    Tasks missing from ``scores[i]`` are not counted (Others may be evaluated on a subset)."""
    per_self: dict[int, float] = {}
    per_others: dict[int, float] = {}
    for i, row in scores.items():
        for t in row:
            if t not in owner:
                raise DrakeDataError(f"client {i} was scored on task {t!r}, which no client owns")
        own = [row[t] for t in row if owner[t] == i]
        other = [row[t] for t in row if owner[t] != i]
        if own:
            per_self[i] = float(np.mean(own))
        if other:
            per_others[i] = float(np.mean(other))
    return SelfOthers(
        self_score=float(np.mean(list(per_self.values()))) if per_self else float("nan"),
        others_score=float(np.mean(list(per_others.values()))) if per_others else float("nan"),
        per_client_self=per_self,
        per_client_others=per_others,
    )


def a_last(history: Sequence[Mapping[str, float]]) -> float:
    """Mean task score after the final round (``history[r][t]``: score of task t after round r)."""
    if not history or not history[-1]:
        raise DrakeDataError("a_last needs at least one round with scores")
    return float(np.mean(list(history[-1].values())))


def a_auc(history: Sequence[Mapping[str, float]], task_start_round: Mapping[str, int]) -> float:
    """(1/R) Σ_r mean over tasks t with start(t) ≤ r of history[r][t]; rounds before any task
    has started are skipped (R counts only the remaining rounds)."""
    per_round: list[float] = []
    for r, row in enumerate(history):
        started = [t for t, s in task_start_round.items() if s <= r]
        if not started:
            continue
        missing = [t for t in started if t not in row]
        if missing:
            raise DrakeDataError(f"round {r}: no score for started task(s) {missing}")
        per_round.append(float(np.mean([row[t] for t in started])))
    if not per_round:
        raise DrakeDataError("a_auc: no round has a started task")
    return float(np.mean(per_round))


def unseen_score(scores: Mapping[int, Mapping[str, float]], unseen_tasks: Sequence[str]) -> float:
    """Mean over clients of the mean over ``unseen_tasks`` of ``scores[i][t]``."""
    per_client = []
    for i, row in scores.items():
        missing = [t for t in unseen_tasks if t not in row]
        if missing:
            raise DrakeDataError(f"client {i}: no score for unseen task(s) {missing}")
        per_client.append(float(np.mean([row[t] for t in unseen_tasks])))
    if not per_client:
        raise DrakeDataError("unseen_score: no clients")
    return float(np.mean(per_client))


def chance_level(choice_lists: Sequence[Sequence[str] | None]) -> float:
    """Expected score of a uniform random pick among each multiple-choice question's options:
    mean of 1/len(choices) over the questions that have a choice list (NaN when none has one)."""
    levels = [1.0 / len(c) for c in choice_lists if c]
    return sum(levels) / len(levels) if levels else float("nan")
