"""task_similarity and relevance_weights against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmosaic_core.rela import relevance_weights, task_similarity

# Three 2×2 task vectors whose column cosines are easy by hand:
#   g1 columns (1,0), (0,1);  g2 columns (1,0), (1,1)/√2;  g3 columns (0,1), (1,0).
G1 = np.array([[1.0, 0.0], [0.0, 1.0]])
G2 = np.array([[1.0, 1.0], [0.0, 1.0]])
G3 = np.array([[0.0, 1.0], [1.0, 0.0]])
S12 = (1.0 + 1.0 / np.sqrt(2.0)) / 2.0  # columns: cos 1 and 1/√2          = 0.853553...
S13 = 0.0  # columns: cos 0 and 0
S23 = 1.0 / (2.0 * np.sqrt(2.0))  # columns: cos 0 and 1/√2              = 0.353553...


def test_task_similarity_three_clients_by_hand() -> None:
    sim = task_similarity([G1, G2, G3])
    expected = np.array([[1.0, S12, S13], [S12, 1.0, S23], [S13, S23, 1.0]])
    np.testing.assert_allclose(sim, expected, atol=1e-6)


def test_relevance_weights_three_clients_by_hand() -> None:
    weights = relevance_weights(task_similarity([G1, G2, G3]), tau=0.5)
    # Row i is a two-way softmax over j ≠ i: w = sigmoid((s_ij − s_ik) / τ).
    #   row 1: sigmoid(2·(0.853553 − 0))        = 0.846461
    #   row 2: sigmoid(2·(0.853553 − 0.353553)) = sigmoid(1) = 0.731059
    #   row 3: sigmoid(2·(0.353553 − 0))        = 0.669762 for client 2
    expected = np.array(
        [
            [0.0, 0.8464606437862121, 1.0 - 0.8464606437862121],
            [0.7310585786300049, 0.0, 1.0 - 0.7310585786300049],
            [1.0 - 0.6697615493266569, 0.6697615493266569, 0.0],
        ]
    )
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    assert np.all(np.diag(weights) == 0.0)


def test_relevance_weights_with_the_client_itself_by_hand() -> None:
    """``include_self``: row i is the softmax over every j of s_ij / τ, s_ii = 1 included."""
    weights = relevance_weights(task_similarity([G1, G2, G3]), tau=0.5, include_self=True)
    sim = np.array([[1.0, S12, S13], [S12, 1.0, S23], [S13, S23, 1.0]])
    # row 1: e^2, e^1.707107, e^0 over their sum (13.9015) = 0.531509, 0.396560, 0.071932
    np.testing.assert_allclose(weights[0], [0.5315086, 0.3965595, 0.0719319], atol=1e-6)
    expected = np.exp(2.0 * sim) / np.exp(2.0 * sim).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, atol=1e-12)
    assert np.all(np.diag(weights) > weights[~np.eye(3, dtype=bool)].reshape(3, 2).max(axis=1))
    np.testing.assert_array_equal(relevance_weights(np.array([[1.0]]), include_self=True), np.ones((1, 1)))


def test_similarity_accepts_torch_and_scale_and_zero_columns() -> None:
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # second column is zero → cosine 0
    b = torch.tensor([[3.0, 1.0], [6.0, 1.0]])
    sim = task_similarity([a, b])
    np.testing.assert_allclose(sim, [[0.5, 0.5], [0.5, 1.0]], atol=1e-6)


def test_relevance_weights_properties() -> None:
    rng = np.random.default_rng(0)
    sim = task_similarity([rng.normal(size=(5, 7)) for _ in range(6)])
    weights = relevance_weights(sim, tau=0.5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.diag(weights) == 0.0) and np.all(weights[~np.eye(6, dtype=bool)] > 0)
    sharper = relevance_weights(sim, tau=0.05)
    assert sharper.max() > weights.max()
    np.testing.assert_array_equal(relevance_weights(np.array([[1.0]])), np.zeros((1, 1)))


@pytest.mark.parametrize(
    ("sim", "tau", "match"),
    [
        (np.ones((2, 3)), 0.5, "N × N"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.5, "NaN"),
        (np.eye(2), 0.0, "tau"),
    ],
)
def test_relevance_weights_rejects_bad_input(sim: np.ndarray, tau: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        relevance_weights(sim, tau)


def test_task_similarity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="vector 1 has shape"):
        task_similarity([np.ones((2, 2)), np.ones((2, 3))])
    with pytest.raises(ValueError, match="vector 0 has NaN"):
        task_similarity([np.full((2, 2), np.nan), np.ones((2, 2))])
    with pytest.raises(ValueError, match="2-D"):
        task_similarity([np.ones(4), np.ones(4)])
    with pytest.raises(ValueError, match="no task vectors"):
        task_similarity([])
