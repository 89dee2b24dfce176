"""Dynamic / static streams, resumption, and the replay memory's priority sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drake_data import DrakeDataError, ReplayMemory, build_stream

TASKS = {"T0": [f"a{i}" for i in range(10)], "T1": [f"b{i}" for i in range(7)], "T2": [f"c{i}" for i in range(5)]}


def test_dynamic_stream_order() -> None:
    s = build_stream(TASKS, mode="dynamic", rounds_per_task=3, seed=1)
    assert len(s) == 9
    for t, (key, ids) in enumerate(TASKS.items()):
        rounds = s.chunks[3 * t:3 * t + 3]
        assert all(s.round_tasks[3 * t + k] == [key] for k in range(3))
        assert sorted(x for c in rounds for x in c) == sorted(ids)  # each task's data, only there
        assert [len(c) for c in rounds] == [len(ids) // 3 + (k < len(ids) % 3) for k in range(3)]
    assert s.task_start_round == {"T0": 0, "T1": 3, "T2": 6}
    assert s.tasks_started(4) == ["T0", "T1"]
    assert build_stream(TASKS, "dynamic", 3, seed=1).chunks == s.chunks  # deterministic
    assert build_stream(TASKS, "dynamic", 3, seed=2).chunks != s.chunks


def test_static_stream_pools_and_shuffles() -> None:
    s = build_stream(TASKS, mode="static", rounds_per_task=2, seed=0)
    assert len(s) == 6
    flat = [x for c in s for x in c]
    assert sorted(flat) == sorted(x for v in TASKS.values() for x in v)
    assert max(len(c) for c in s) - min(len(c) for c in s) <= 1
    assert len({t for rt in s.round_tasks[:2] for t in rt}) >= 2  # tasks mixed early on
    assert s.task_start_round == {"T0": 0, "T1": 0, "T2": 0}


def test_stream_resume_after_restart() -> None:
    s = build_stream(TASKS, "dynamic", 3, seed=5)
    seen = [s.next_chunk() for _ in range(4)]
    state = json.loads(json.dumps(s.state_dict()))
    fresh = build_stream(TASKS, "dynamic", 3, seed=5)
    fresh.load_state_dict(state)
    assert fresh.next_chunk() == s.next_chunk() == s.chunks[4]
    assert seen == s.chunks[:4]
    with pytest.raises(DrakeDataError, match="seed"):
        build_stream(TASKS, "dynamic", 3, seed=6).load_state_dict(state)
    with pytest.raises(DrakeDataError, match="fingerprint"):
        build_stream({**TASKS, "T2": ["c0", "c1", "c2", "zz"]}, "dynamic", 3, seed=5).load_state_dict(state)


def test_stream_bad_input() -> None:
    with pytest.raises(DrakeDataError, match="appears in task T0 and task T1"):
        build_stream({"T0": ["x", "y"], "T1": ["x", "z"]}, rounds_per_task=1)
    with pytest.raises(DrakeDataError, match="fewer than rounds_per_task"):
        build_stream({"T0": ["x"]}, rounds_per_task=2)
    with pytest.raises(DrakeDataError, match="mode"):
        build_stream(TASKS, mode="shuffled")  # type: ignore[arg-type]


def test_replay_probabilities_match_softmax() -> None:
    mem = ReplayMemory(seed=0)
    mem.add(["a", "b", "c", "d"])
    state = mem.state_dict()
    state["counts"] = [0.0, 0.125, 0.25, 1.0]
    mem.load_state_dict(state)
    expected = np.exp(-np.array(state["counts"]) / 0.125)
    expected /= expected.sum()
    np.testing.assert_allclose(mem.probabilities(), expected, rtol=1e-12)
    # empirical first-draw frequencies over many independent draws
    hits = dict.fromkeys("abcd", 0)
    trials = 4000
    for t in range(trials):
        m = ReplayMemory(seed=t)
        m.load_state_dict({**state, "rng": m.state_dict()["rng"]})
        hits[m.sample(1)[0]] += 1
    freq = np.array([hits[k] / trials for k in "abcd"])
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / trials) + 1e-3)


def test_replay_counts_decay_and_priority_balances_use() -> None:
    mem = ReplayMemory(seed=0)
    mem.add([f"s{i}" for i in range(20)])
    drawn = mem.sample(5)
    counts = dict(zip(mem.ids, mem.counts, strict=True))
    assert len(set(drawn)) == 5 and all(counts[d] == 1.0 for d in drawn)
    mem.sample(5)
    assert sorted(set(np.round(mem.counts, 6))) in ([0.0, 0.99, 1.0], [0.0, 0.99, 1.99], [0.0, 0.99, 1.0, 1.99])
    # priority sampling uses samples far more evenly than uniform sampling would
    mem2 = ReplayMemory(seed=1, decay=1.0)
    mem2.add([f"s{i}" for i in range(40)])
    for _ in range(200):
        mem2.sample(4)
    assert mem2.counts.max() - mem2.counts.min() <= 2  # uniform would spread ~±9 around 20
    rng = np.random.default_rng(1)
    uniform = np.bincount(np.concatenate([rng.choice(40, 4, replace=False) for _ in range(200)]), minlength=40)
    assert uniform.max() - uniform.min() > 5


def test_replay_resume_exactly() -> None:
    a = ReplayMemory(seed=3)
    a.add([f"x{i}" for i in range(30)])
    for _ in range(7):
        a.sample(4)
    state = json.loads(json.dumps(a.state_dict()))
    b = ReplayMemory(seed=999)
    b.load_state_dict(state)
    b.add(["new1", "new2"])
    a.add(["new1", "new2"])
    assert [a.sample(4) for _ in range(10)] == [b.sample(4) for _ in range(10)]
    with pytest.raises(DrakeDataError, match="already holds"):
        a.add(["x3"])


def test_replay_capacity_evicts_oldest() -> None:
    mem = ReplayMemory(capacity=3)
    mem.add(["a", "b"])
    mem.add(["c", "d"])
    assert mem.ids == ["b", "c", "d"] and len(mem.counts) == 3
