"""TaskVectorAccumulator: shared rows, noise, round mean, smoothing, resume after restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmosaic_core.rela import TaskVectorAccumulator, selected_rows

SHAPE = (20, 12)


class _FakeProbe:
    """Returns a fixed sequence of gradients and counts calls."""

    def __init__(self, gradients: list[torch.Tensor]) -> None:
        self.gradients = gradients
        self.calls = 0

    def gradient(self, batch: dict) -> torch.Tensor:  # noqa: ARG002
        g = self.gradients[self.calls]
        self.calls += 1
        return g


def _grads(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


def test_rows_are_fixed_by_the_shared_seed() -> None:
    rows = selected_rows(20, 0.4, seed=7)
    assert rows.tolist() == sorted(rows.tolist()) and len(rows) == 8
    assert torch.equal(rows, selected_rows(20, 0.4, seed=7))
    assert not torch.equal(rows, selected_rows(20, 0.4, seed=8))
    g = _grads(1)[0]
    a = TaskVectorAccumulator(seed=7, noise_seed=1, noise_std=0.0)
    b = TaskVectorAccumulator(seed=7, noise_seed=2, noise_std=0.0)
    assert torch.equal(a.sanitise(g), g[rows]) and torch.equal(b.sanitise(g), g[rows])


def test_noise_is_private_and_has_the_configured_scale() -> None:
    g = torch.zeros(200, 300)
    a = TaskVectorAccumulator(seed=0, noise_seed=1, noise_std=1e-4).sanitise(g)
    b = TaskVectorAccumulator(seed=0, noise_seed=2, noise_std=1e-4).sanitise(g)
    assert a.shape == (80, 300)
    assert float(a.std()) == pytest.approx(1e-4, rel=0.05)
    assert not torch.equal(a, b)


def test_round_mean_and_smoothing() -> None:
    g1, g2, g3, g4 = _grads(4)
    rows = selected_rows(SHAPE[0], 0.4, seed=0)
    acc = TaskVectorAccumulator(seed=0, noise_seed=0, noise_std=0.0)
    acc.add(g1)
    acc.add(g2)
    first = acc.end_round()
    torch.testing.assert_close(first, ((g1 + g2) / 2)[rows])  # first round: ĝ = round mean
    acc.add(g3)
    acc.add(g4)
    second = acc.end_round()
    torch.testing.assert_close(second, (((g3 + g4) / 2)[rows] + first) / 2)  # ĝ ← (mean + ĝ)/2
    # a round without updates keeps ĝ
    torch.testing.assert_close(acc.end_round(), second)
    assert acc.rounds_completed == 3


def test_end_round_without_any_update_fails() -> None:
    with pytest.raises(RuntimeError, match="no task-vector update"):
        TaskVectorAccumulator().end_round()


def test_maybe_update_runs_every_m_steps() -> None:
    probe = _FakeProbe(_grads(10))
    acc = TaskVectorAccumulator(probe, every_m_steps=10, noise_seed=0)  # type: ignore[arg-type]
    done = [acc.maybe_update(step, {}) for step in range(25)]
    assert [s for s, d in enumerate(done) if d] == [0, 10, 20]
    assert probe.calls == 3 and acc.round_count == 3
    with pytest.raises(RuntimeError, match="needs a probe"):
        TaskVectorAccumulator().maybe_update(0, {})


def _run(acc: TaskVectorAccumulator, grads: list[torch.Tensor]) -> None:
    for g in grads:
        acc.add(g)


def test_resume_after_restart_continues_identically(tmp_path: Path) -> None:
    grads = _grads(7, seed=3)
    config = {"rows_fraction": 0.4, "noise_std": 1e-2, "every_m_steps": 10, "seed": 5}

    straight = TaskVectorAccumulator(noise_seed=11, **config)  # type: ignore[arg-type]
    _run(straight, grads[:3])
    straight.end_round()
    _run(straight, grads[3:5])
    _run(straight, grads[5:])
    expected = straight.end_round()

    before = TaskVectorAccumulator(noise_seed=11, **config)  # type: ignore[arg-type]
    _run(before, grads[:3])
    before.end_round()
    _run(before, grads[3:5])  # restart in the middle of a round
    before.save(tmp_path / "state" / "rela.safetensors")
    assert not list((tmp_path / "state").glob("*.tmp"))

    after = TaskVectorAccumulator(**config)  # type: ignore[arg-type]  # fresh noise seed, replaced on load
    after.load(tmp_path / "state" / "rela.safetensors")
    assert after.noise_seed == 11 and after.round_count == 2
    _run(after, grads[5:])
    torch.testing.assert_close(after.end_round(), expected, rtol=0, atol=0)


def test_state_before_any_update_round_trips(tmp_path: Path) -> None:
    acc = TaskVectorAccumulator(noise_seed=4)
    acc.save(tmp_path / "empty.safetensors")
    again = TaskVectorAccumulator()
    again.load(tmp_path / "empty.safetensors")
    assert again.shape is None and again.noise_seed == 4


def test_resume_rejects_a_different_configuration(tmp_path: Path) -> None:
    acc = TaskVectorAccumulator(seed=1, noise_seed=0)
    acc.add(_grads(1)[0])
    acc.save(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="seed"):
        TaskVectorAccumulator(seed=2).load(tmp_path / "s.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows_fraction": 0.0}, "rows_fraction"),
        ({"rows_fraction": 1.5}, "rows_fraction"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"every_m_steps": 0}, "every_m_steps"),
        ({"seed": -3}, "seed"),
    ],
)
def test_accumulator_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskVectorAccumulator(**kwargs)


def test_accumulator_rejects_bad_gradients() -> None:
    acc = TaskVectorAccumulator(noise_seed=0)
    acc.add(torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="expected"):
        acc.add(torch.zeros(SHAPE[0], SHAPE[1] + 1))
    bad = torch.zeros(SHAPE)
    bad[acc.rows[0], 0] = float("nan")  # type: ignore[index]
    with pytest.raises(ValueError, match="NaN"):
        acc.add(bad)
