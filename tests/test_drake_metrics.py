"""Self / Others / A_last / A_AUC / unseen on a hand-computed example."""

from __future__ import annotations

import pytest

from drake_data import DrakeDataError, a_auc, a_last, self_others, task_score, unseen_score
from drake_data.metrics import evaluate_task
from drake_data.prompts import RenderedSample


def test_self_others_hand_computed() -> None:
    owner = {"A": 0, "B": 0, "C": 1, "D": 2}
    scores = {0: {"A": 80, "B": 60, "C": 30, "D": 10},   # self 70, others 20
              1: {"A": 20, "B": 40, "C": 90, "D": 50},   # self 90, others (20+40+50)/3 = 36.667
              2: {"A": 0, "C": 60, "D": 40}}             # self 40, others 30 (B not evaluated)
    r = self_others(scores, owner)
    assert r.per_client_self == {0: 70, 1: 90, 2: 40}
    assert r.per_client_others[1] == pytest.approx(110 / 3)
    assert r.self_score == pytest.approx(200 / 3)
    assert r.others_score == pytest.approx((20 + 110 / 3 + 30) / 3)
    with pytest.raises(DrakeDataError, match="no client owns"):
        self_others({0: {"Z": 1.0}}, owner)


def test_a_last_and_a_auc_hand_computed() -> None:
    # two tasks, 2 rounds each (dynamic): T1 starts at round 2
    history = [{"T0": 20, "T1": 0}, {"T0": 60, "T1": 10}, {"T0": 50, "T1": 30}, {"T0": 40, "T1": 80}]
    start = {"T0": 0, "T1": 2}
    # per round: 20, 60, (50+30)/2 = 40, (40+80)/2 = 60  → mean 45
    assert a_auc(history, start) == pytest.approx(45.0)
    assert a_last(history) == pytest.approx(60.0)
    # static: every task counts from round 0: (10 + 35 + 40 + 60) / 4
    assert a_auc(history, {"T0": 0, "T1": 0}) == pytest.approx(36.25)
    with pytest.raises(DrakeDataError, match="no score for started task"):
        a_auc([{"T0": 1}], {"T0": 0, "T1": 0})


def test_unseen_and_task_scores() -> None:
    assert unseen_score({0: {"U1": 50, "U2": 70, "A": 0}, 1: {"U1": 10, "U2": 30}}, ["U1", "U2"]) == pytest.approx(40.0)
    assert task_score([1, 0, 1, 1]) == 75.0
    samples = [RenderedSample("1", "Q", "red", [], ["red", "blue"], "multi-choice"),
               RenderedSample("2", "Q", "red circle", [], None, "open-ended")]
    assert evaluate_task(["B", "red"], samples) == pytest.approx(100 * (0 + 2 / 3) / 2)


def test_chance_level_is_the_mean_of_one_over_the_options() -> None:
    from drake_data.metrics import chance_level

    assert chance_level([["a", "b"], ["a", "b", "c", "d"], None]) == (0.5 + 0.25) / 2
    assert chance_level([None, []]) != chance_level([None, []])  # NaN: no multiple-choice question
