"""The ServerApp's strategy and round loop, driven by mock clients on an in-process grid."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import InProcessGrid, run_federation, seeded
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmosaic_cli.comparison import clients_with_stale_scores
from fedmosaic_core.rela import relevance_weights, task_similarity
from fedmosaic_flower import records as proto
from fedmosaic_flower.config import parse_run_config
from server_app.report import summarise, write_report
from server_app.run_store import RunStateError, RunStore

R = 4
WIDTH = {"arch-a": 16, "arch-b": 24}


def _seeded(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(seeded(*parts))


class MockClient:
    """A deterministic stand-in for a ClientApp: local state = f(received global, round)."""

    def __init__(self, client_id: str, arch: str, group: int, *, fault: str = "", uploads_all: bool = False) -> None:
        """``uploads_all``: upload both local states whatever the round config asks (as an older client)."""
        self.client_id, self.arch, self.group, self.fault = client_id, arch, group, fault
        self.uploads_all = uploads_all
        self.uploaded: dict[int, set[str]] = {}
        self.same_arch_bytes: dict[int, int] = {}
        self.received: dict[int, dict[str, torch.Tensor]] = {}
        d = WIDTH[arch]
        self.shared_schema = {f"pq.{k}.q_proj.{n}": ([R, R] if n == "P" else [R]) for k in range(2) for n in "PQ"}
        self.same_schema = {f"lora.{i}.q_proj.{n}": ([R, d] if n == "A" else [d, R]) for i in (0, 2) for n in "AB"}

    def task_vector(self) -> np.ndarray:
        base = np.random.default_rng(100 + self.group).normal(size=(8, 32))
        noise = np.random.default_rng(seeded(self.client_id)).normal(size=(8, 32))
        return (base + 0.3 * noise).astype(np.float32)

    def __call__(self, msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            info = proto.make_client_info(
                self.client_id, self.arch, f"model-{self.arch}",
                schema={"shared": self.shared_schema, "same-arch": self.same_schema},
            )
            return Message(RecordDict({proto.CLIENT_INFO: info}), reply_to=msg)
        server_round = int(msg.content.config_records[proto.CONFIG]["server-round"])
        if self.fault == "silent":
            return None
        received = {}
        if proto.GLOBAL_SHARED in msg.content.array_records:
            received = proto.decode_state(msg.content.array_records[proto.GLOBAL_SHARED], "g")
        self.received[server_round] = received
        same_arch = msg.content.array_records.get(proto.GLOBAL_SAME_ARCH)
        self.same_arch_bytes[server_round] = same_arch.count_bytes() if same_arch is not None else 0
        gen = _seeded(self.client_id, server_round)
        shared = {
            k: torch.randn(tuple(s), generator=gen) + 0.5 * received.get(k, torch.zeros(tuple(s)))
            for k, s in self.shared_schema.items()
        }
        same = {k: torch.randn(tuple(s), generator=gen) for k, s in self.same_schema.items()}
        vector = self.task_vector()
        if self.fault == "nan":
            shared["pq.0.q_proj.P"][0, 0] = float("nan")
        elif self.fault == "missing":
            del shared["pq.1.q_proj.Q"]
        elif self.fault == "shape":
            same["lora.0.q_proj.A"] = torch.zeros(R + 1, WIDTH[self.arch])
        elif self.fault == "scaled":
            shared = {k: v * 1e6 for k, v in shared.items()}
        elif self.fault == "oversized":
            same["lora.0.q_proj.pad"] = torch.zeros(600_000)
        content = RecordDict(
            {
                proto.LOCAL_SHARED: proto.encode_state(shared),
                proto.LOCAL_SAME_ARCH: proto.encode_state(same),
                proto.TASK_VECTOR: proto.encode_task_vector(vector),
                proto.METRICS: MetricRecord({"train-loss": 1.0 / server_round}),
                proto.CLIENT_INFO: proto.make_client_info(
                    self.client_id, self.arch, f"model-{self.arch}",
                    scores={"self": {"t": 0.1 * server_round}, "others": {}, "unseen": {}},
                ),
            }
        )
        if self.fault == "no-info":
            del content.config_records[proto.CLIENT_INFO]
        asked = msg.content.config_records[proto.CONFIG]
        for key, flag in ((proto.LOCAL_SHARED, "upload-shared"), (proto.LOCAL_SAME_ARCH, "upload-same-arch")):
            if not self.uploads_all and not asked.get(flag, True):
                del content.array_records[key]
        self.uploaded[server_round] = set(content.array_records)
        return Message(content, reply_to=msg)


def _clients(faults: dict[str, str] | None = None) -> dict[int, MockClient]:
    faults = faults or {}
    specs = [("c0", "arch-a", 0), ("c1", "arch-a", 0), ("c2", "arch-b", 1), ("c3", "arch-b", 1), ("c4", "arch-a", 1)]
    return {100 + i: MockClient(cid, arch, g, fault=faults.get(cid, "")) for i, (cid, arch, g) in enumerate(specs)}


def _config(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    raw = {"num-server-rounds": 3, "output-dir": str(tmp_path), "run-name": "t", "max-reply-mb": 1.0}
    raw.update(extra)
    return parse_run_config(raw)


def _expected_globals(
    clients: dict[int, MockClient], server_round: int, ids: list[str], include_self: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Recompute what RELA should have sent for ``server_round + 1`` (a slow, explicit loop)."""
    by_id = {c.client_id: c for c in clients.values()}
    weights = relevance_weights(task_similarity([by_id[c].task_vector() for c in ids]), tau=0.5,
                                include_self=include_self)
    locals_ = {}
    for cid in ids:
        c = by_id[cid]
        gen = _seeded(cid, server_round)
        received = c.received[server_round]
        locals_[cid] = {
            k: torch.randn(tuple(s), generator=gen) + 0.5 * received.get(k, torch.zeros(tuple(s)))
            for k, s in c.shared_schema.items()
        }
    out = {}
    for i, cid in enumerate(ids):
        out[cid] = {k: sum(weights[i, j] * locals_[other][k] for j, other in enumerate(ids)) for k in locals_[cid]}
    return out


def test_each_client_gets_its_own_relevance_weighted_global(tmp_path: Path) -> None:
    clients = _clients()
    grid = InProcessGrid(dict(clients))
    result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 2}))
    ids = result.strategy.last_weight_ids
    assert sorted(ids) == ["c0", "c1", "c2", "c3", "c4"]
    expected = _expected_globals(clients, 1, ids)
    by_id = {c.client_id: c for c in clients.values()}
    received = {cid: by_id[cid].received[2] for cid in ids}
    for cid in ids:
        for key, value in expected[cid].items():
            torch.testing.assert_close(received[cid][key], value.float(), rtol=1e-5, atol=1e-6)
    # every client got a different global state
    flat = [torch.cat([received[c][k].flatten() for k in sorted(received[c])]) for c in ids]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.allclose(flat[i], flat[j])
    # related clients (same task group) weigh each other more than unrelated ones
    w = result.strategy.last_weights
    assert w is not None
    i0, i1, i2 = ids.index("c0"), ids.index("c1"), ids.index("c2")
    assert w[i0, i1] > w[i0, i2]
    # round 1 carried no global state; the log has one row per client and round
    assert all(not by_id[c].received[1] for c in ids)
    assert len(result.rows) == 10
    assert (tmp_path / "t" / "rounds.jsonl").exists()


def test_include_self_from_the_run_config_keeps_each_client_in_its_own_global(tmp_path: Path) -> None:
    clients = _clients()
    result = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 2,
                                                                             "include-self": True}))
    ids = result.strategy.last_weight_ids
    w = result.strategy.last_weights
    assert w is not None and np.all(np.diag(w) > 0) and np.allclose(w.sum(axis=1), 1.0)
    by_id = {c.client_id: c for c in clients.values()}
    for cid, want in _expected_globals(clients, 1, ids, include_self=True).items():
        for key, value in want.items():
            torch.testing.assert_close(by_id[cid].received[2][key], value.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fault", ["nan", "missing", "shape", "oversized", "no-info"])
def test_malformed_reply_is_excluded_and_round_completes(tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    clients = _clients({"c3": fault})
    grid = InProcessGrid(dict(clients))
    with caplog.at_level(logging.WARNING):
        result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 2}))
    assert result.last_round == 2
    assert "c3" not in result.strategy.last_weight_ids
    assert len(result.strategy.last_weight_ids) == 4
    reasons = [r.getMessage() for r in caplog.records if "excluded" in r.getMessage()]
    assert reasons, "an exclusion must be logged with its reason"
    assert any(("c3" in m) or ("node-103" in m) for m in reasons)


def test_silent_client_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clients = _clients({"c1": "silent"})
    with caplog.at_level(logging.WARNING):
        result = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 1}))
    assert "c1" not in result.strategy.last_weight_ids
    assert any("did not reply in time" in r.getMessage() and "c1" in r.getMessage() for r in caplog.records)


def test_each_rounds_outcome_is_logged_and_reaches_the_report(tmp_path: Path) -> None:
    """``outcomes.jsonl`` names who was selected, who counted and who was left out with the reason;
    the report carries each client's last selected round, and the staleness check of ``compare``
    flags the clients that were selected but never reported."""
    clients = _clients({"c1": "silent", "c3": "nan"})
    result = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 2}))
    lines = [json.loads(line) for line in (result.run_dir / "outcomes.jsonl").read_text().splitlines()]
    assert [o["round"] for o in lines] == [1, 2]
    for outcome in lines:
        assert outcome["selected"] == ["c0", "c1", "c2", "c3", "c4"]
        assert outcome["replied"] == ["c0", "c2", "c4"] and outcome["missing"] == ["c1"]
        assert list(outcome["excluded"]) == ["c3"] and "finite" in outcome["excluded"]["c3"]
    summary, table = write_report(result.run_dir, result.rows, None, [], "drops", outcomes=lines)
    assert summary["last_selected_round"] == {c: 2 for c in ("c0", "c1", "c2", "c3", "c4")}
    assert summary["left_out"]["c1"] == {"1": "did not reply in time", "2": "did not reply in time"}
    assert set(summary["left_out"]) == {"c1", "c3"}
    assert "client c1 left out of round(s) 1: did not reply in time; 2: did not reply in time" in table
    assert clients_with_stale_scores(summary, None) == ["c1", "c3"]
    assert clients_with_stale_scores(summarise(result.rows), None) == []  # without the outcomes: unseen


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    full_clients = _clients()
    full = run_federation(InProcessGrid(dict(full_clients)), _config(tmp_path / "full"))

    part_clients = _clients()
    run_federation(InProcessGrid(dict(part_clients)), _config(tmp_path / "part"), stop_after=2)
    resumed_clients = _clients()  # fresh processes: the mock clients are deterministic in (id, round)
    for node, client in resumed_clients.items():
        client.received = dict(part_clients[node].received)
    resumed = run_federation(InProcessGrid(dict(resumed_clients)), _config(tmp_path / "part", resume=True))
    assert resumed.last_round == 3
    for cid, state in full.strategy.globals.items():
        other = resumed.strategy.globals[cid]
        for key, value in state.shared.items():
            torch.testing.assert_close(other.shared[key], value, rtol=0, atol=0)
    assert [r["round"] for r in resumed.rows] == [r["round"] for r in full.rows]
    outcomes = [(run.run_dir / "outcomes.jsonl").read_text() for run in (full, resumed)]
    assert outcomes[0] == outcomes[1] and len(outcomes[0].splitlines()) == 3


def test_resume_with_changed_config_is_refused(tmp_path: Path) -> None:
    run_federation(InProcessGrid(dict(_clients())), _config(tmp_path), stop_after=1)
    with pytest.raises(RunStateError, match="tau"):
        run_federation(InProcessGrid(dict(_clients())), _config(tmp_path, resume=True, tau=0.9))


def test_a_second_serverapp_of_the_same_run_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    """Two ServerApps must not write one run folder: while the first holds the run open, the
    second stops with one error naming the holder, and the first's log and checkpoints are intact."""
    config = _config(tmp_path, **{"num-server-rounds": 2})
    first = run_federation(InProcessGrid(dict(_clients())), config, stop_after=1)
    rows = (first.run_dir / "rounds.jsonl").read_text()
    with RunStore(config) as holder:
        holder.open()  # resume=False: the finished round-1 run is moved aside and a fresh one begins
        assert holder.lock_path.read_text().strip() == str(os.getpid())
        with pytest.raises(RunStateError, match=rf"in use by another ServerApp \(pid {os.getpid()}\)"):
            run_federation(InProcessGrid(dict(_clients())), config)
        assert not (holder.dir / "rounds.jsonl").exists() and not (holder.dir / "checkpoints").exists()
    moved = [d for d in tmp_path.rglob("rounds.jsonl") if "-previous-" in str(d)]
    assert len(moved) == 1 and moved[0].read_text() == rows
    assert not holder.lock_path.exists()  # removed on close
    again = run_federation(InProcessGrid(dict(_clients())), config)  # the lock is released on close
    assert again.last_round == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")] == []


def test_a_lock_file_removed_while_claiming_is_not_the_lock_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the holder closes (removing the lock file) between our open and our flock, the lock we
    get is on a removed file that a third ServerApp would not see: the claim must lock the new file."""
    import fcntl

    from server_app import run_store

    config = _config(tmp_path)
    store = RunStore(config)
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_left(fd: int, op: int) -> None:
        if not calls:  # the holder's close, between our open and our first flock
            store.lock_path.unlink()
            store.lock_path.write_text("")
        calls.append(fd)
        real_flock(fd, op)

    store.lock_path.parent.mkdir(parents=True, exist_ok=True)
    store.lock_path.write_text("123\n")  # left by a ServerApp that was killed
    monkeypatch.setattr(run_store.fcntl, "flock", flock_after_the_holder_left)
    with store:
        store.open()
        assert len(calls) == 2  # the first lock was on the removed file: claimed again
        assert os.fstat(calls[1]).st_ino == store.lock_path.stat().st_ino
        assert store.lock_path.read_text().strip() == str(os.getpid())
    assert not store.lock_path.exists()


def test_local_strategy_sends_no_global_state_and_asks_for_no_local_state(tmp_path: Path) -> None:
    clients = _clients()
    result = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, strategy="local", **{"num-server-rounds": 2}))
    assert all(not c.received[2] for c in clients.values())
    assert all(c.uploaded[r] == {proto.TASK_VECTOR} for c in clients.values() for r in (1, 2))
    assert sorted((r["round"], r["client"]) for r in result.rows) == [(r, f"c{i}") for r in (1, 2) for i in range(5)]
    assert all(r["bytes_up"] < 4096 for r in result.rows)  # scores and metrics only (the adapters: ~10 KB)


@pytest.mark.parametrize("share", [True, False])
def test_shared_only_ablation_sends_and_asks_for_no_plain_lora_states(tmp_path: Path, share: bool) -> None:
    clients = _clients()
    result = run_federation(InProcessGrid(dict(clients)),
                            _config(tmp_path, **{"num-server-rounds": 2, "share-same-arch": share}))
    for client in clients.values():
        assert client.received[2]  # P/Q globals either way
        assert (client.same_arch_bytes[2] > 0) == share
        assert (proto.LOCAL_SAME_ARCH in client.uploaded[1]) == share and proto.LOCAL_SHARED in client.uploaded[1]
    ids = [f"c{i}" for i in range(5)]
    expected = _expected_globals(clients, 1, ids)
    for client in clients.values():  # RELA's P/Q mix as with the plain-LoRA states
        for key, value in expected[client.client_id].items():
            torch.testing.assert_close(client.received[2][key], value, rtol=1e-5, atol=1e-6)
    assert len({r["client"] for r in result.rows if r["round"] == 2}) == 5


def test_a_state_uploaded_though_not_asked_for_is_ignored(tmp_path: Path) -> None:
    """A client that uploads its plain-LoRA state when the round does not ask for it (an older
    client) is aggregated as if it had not: the P/Q globals are the same, no plain-LoRA global."""
    runs = {}
    for uploads_all in (False, True):
        clients = {n: MockClient(c.client_id, c.arch, c.group, uploads_all=uploads_all) for n, c in _clients().items()}
        run_federation(InProcessGrid(dict(clients)), _config(tmp_path / str(uploads_all), **{
            "num-server-rounds": 2, "share-same-arch": False}))
        runs[uploads_all] = clients
    for node, client in runs[True].items():
        assert proto.LOCAL_SAME_ARCH in client.uploaded[1] and client.same_arch_bytes[2] == 0
        assert client.received[2].keys() == runs[False][node].received[2].keys()
        for key, value in client.received[2].items():
            assert torch.equal(value, runs[False][node].received[2][key])


def test_report_writes_table_and_plots(tmp_path: Path) -> None:
    result = run_federation(InProcessGrid(dict(_clients())), _config(tmp_path, **{"num-server-rounds": 2}))
    summary, table = write_report(
        result.run_dir, result.rows, result.strategy.last_weights, result.strategy.last_weight_ids, "mock"
    )
    assert "| c0 |" in table
    assert summary["clients"]["c0"]["self_last"] == pytest.approx(0.2)
    assert summary["clients"]["c0"]["self_auc"] == pytest.approx(0.15)
    for name in ("summary.json", "table.md", "scores.png", "relevance.png"):
        assert (result.run_dir / "report" / name).stat().st_size > 0
    assert "gate_beta" not in summary and not (result.run_dir / "report" / "gates.png").exists()


def test_report_plots_the_gate_values_clients_log(tmp_path: Path) -> None:
    from server_app.report import gate_curves

    rows = [{"client": c, "round": r, "scores": {"self": {"t": 0.5}}, "beta_block_0": 0.5 + 0.01 * r,
             "beta_block_3": 0.4} for c in ("0", "1") for r in (2, 1)]
    rows.append({"client": "2", "round": 1, "scores": {"self": {"t": 0.5}}})  # logged no β (e.g. an older client)
    curves = gate_curves(rows)
    assert curves == {c: {0: [(1, 0.51), (2, 0.52)], 3: [(1, 0.4), (2, 0.4)]} for c in ("0", "1")}
    summary, _ = write_report(tmp_path, rows, None, [], "gates")
    assert summary["gate_beta"]["1"]["0"] == [(1, 0.51), (2, 0.52)]
    assert (tmp_path / "report" / "gates.png").stat().st_size > 0


def test_round_config_marks_last_round_for_others(tmp_path: Path) -> None:
    from server_app.strategy import round_config

    config = _config(tmp_path, **{"eval-others-every": 2, "num-server-rounds": 3})
    flags = [bool(round_config(config, r)["eval-others"]) for r in (1, 2, 3)]
    assert flags == [False, True, True]
    assert isinstance(round_config(config, 1), ConfigRecord)


@pytest.mark.parametrize(("overrides", "uploads"), [
    ({}, (True, True)),
    ({"strategy": "local"}, (False, False)),
    ({"share-same-arch": False}, (True, False)),
    ({"strategy": "feddpa"}, (True, True)),
    ({"strategy": "fedavg"}, (True, True)),
])
def test_round_config_asks_for_the_local_states_the_server_aggregates(
    tmp_path: Path, overrides: dict[str, object], uploads: tuple[bool, bool]
) -> None:
    from server_app.strategy import round_config

    instructions = round_config(_config(tmp_path, **overrides), 1)
    assert (instructions["upload-shared"], instructions["upload-same-arch"]) == uploads


def test_partial_participation_trains_a_seeded_fraction(tmp_path: Path) -> None:
    clients = _clients()
    grid = InProcessGrid(dict(clients))
    config = _config(tmp_path, **{"num-server-rounds": 3, "fraction-train": 0.4})
    result = run_federation(grid, config)
    by_round: dict[int, list[str]] = {}
    for row in result.rows:
        by_round.setdefault(int(row["round"]), []).append(str(row["client"]))
    assert sorted(by_round) == [1, 2, 3]
    assert all(len(ids) == 2 for ids in by_round.values())  # ceil(0.4 * 5)
    # the sample changes from round to round
    assert len({tuple(sorted(ids)) for ids in by_round.values()}) > 1
    # only the sampled clients were sent train messages
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_msgs) == 6
    # the same seed samples the same clients again
    again_config = _config(tmp_path / "again", **{"num-server-rounds": 3, "fraction-train": 0.4})
    again = run_federation(InProcessGrid(dict(_clients())), again_config)
    pairs = [(r["round"], r["client"]) for r in result.rows]
    assert [(r["round"], r["client"]) for r in again.rows] == pairs
    # the round outcomes name the sampled clients; none is stale at its last selected round
    outcomes = [json.loads(line) for line in (result.run_dir / "outcomes.jsonl").read_text().splitlines()]
    assert {o["round"]: o["selected"] for o in outcomes} == {k: sorted(v) for k, v in by_round.items()}
    summary = summarise(result.rows, outcomes)
    assert clients_with_stale_scores(summary, None) == []
    assert all(summary["last_selected_round"][c] == summary["clients"][c]["last_round"] for c in summary["clients"])


class ReversedRepliesGrid(InProcessGrid):
    """Replies come back in the reverse order (clients finishing in another order)."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_reply_order_does_not_change_the_run(tmp_path: Path) -> None:
    config = _config(tmp_path / "a", **{"num-server-rounds": 3})
    forward = run_federation(InProcessGrid(dict(_clients())), config)
    backward = run_federation(ReversedRepliesGrid(dict(_clients())), _config(tmp_path / "b", **{"num-server-rounds": 3}))
    assert forward.strategy.globals.keys() == backward.strategy.globals.keys()
    for cid, state in forward.strategy.globals.items():
        for key, value in state.shared.items():
            assert torch.equal(backward.strategy.globals[cid].shared[key], value), (cid, key)
    assert [(r["round"], r["client"]) for r in forward.rows] == [(r["round"], r["client"]) for r in backward.rows]


# -- identity and schemas decided against hostile clients ---------------------------------------
class Impostor(MockClient):
    """Registers and replies as ``victim`` from its own node (it computes the victim's states)."""

    def __init__(self, victim: MockClient) -> None:
        super().__init__(victim.client_id, victim.arch, victim.group)


class OrderedGrid(InProcessGrid):
    """Delivers the impostor node's messages first or last, in every exchange."""

    def __init__(self, handlers: dict[int, MockClient], first: int | None = None, last: int | None = None) -> None:
        super().__init__(dict(handlers))
        self.first, self.last = first, last

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        nodes = sorted(self.handlers)
        if self.first is not None:
            nodes = [self.first] + [n for n in nodes if n != self.first]
        return nodes

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if self.last is not None:
            replies.sort(key=lambda m: m.metadata.src_node_id == self.last)
        if self.first is not None:
            replies.sort(key=lambda m: m.metadata.src_node_id != self.first)
        return replies


def _received_by_node(grid: InProcessGrid, node: int) -> list[Message]:
    return [m for m in grid.sent if m.metadata.dst_node_id == node and m.metadata.message_type == MessageType.TRAIN]


def test_a_handshake_claiming_a_bound_client_id_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    honest = _clients()
    handlers = {**honest, 900: Impostor(honest[100])}  # node 900 claims c0 (node 100)
    grid = OrderedGrid(handlers, last=900)
    with caplog.at_level(logging.WARNING):
        result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 2}))
    assert result.strategy.node_of["c0"] == 100
    assert _received_by_node(grid, 900) == []  # never got c0's personal global
    assert len(_received_by_node(grid, 100)) == 2
    assert any("node 900 claims client id 'c0', which is bound to node 100; refused" in r.getMessage()
               for r in caplog.records)
    clean = run_federation(InProcessGrid(_clients()), _config(tmp_path, **{"num-server-rounds": 2, "run-name": "clean"}))
    for cid, state in clean.strategy.globals.items():  # the honest globals are those of a run without it
        for key, value in state.shared.items():
            assert torch.equal(result.strategy.globals[cid].shared[key], value)


@pytest.mark.parametrize("order", ["impostor-first", "impostor-last"])
def test_a_reply_claiming_another_client_is_excluded_in_either_order(tmp_path: Path, order: str) -> None:
    """The impostor node registered as a client of its own (c9), then answers as c0."""
    honest = _clients()

    class ReplyImpostor(MockClient):
        def __call__(self, msg: Message) -> Message | None:
            if msg.metadata.message_type == MessageType.QUERY:
                return super().__call__(msg)
            return Impostor(honest[100])(msg)

    handlers = {**honest, 900: ReplyImpostor("c9", "arch-a", 0)}
    grid = OrderedGrid(handlers, **({"first": 900} if order == "impostor-first" else {"last": 900}))
    result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 1}))
    outcome = result.strategy.last_outcome
    assert outcome is not None
    assert "c0" in outcome.replied and "c9" not in outcome.replied  # c0's own reply is used
    assert "reply for client 'c0' came from node 900, not from its node 100" in outcome.excluded["c9"]


def test_schema_poisoning_by_the_first_registrant_fails(tmp_path: Path) -> None:
    """A client that registers first with another same-architecture schema (r = 8) is the one
    excluded; the honest clients of its architecture are aggregated as without it."""

    class Poisoner(MockClient):
        def __init__(self) -> None:
            super().__init__("c9", "arch-a", 0)
            d = WIDTH["arch-a"]
            self.same_schema = {f"lora.{i}.q_proj.{n}": ([8, d] if n == "A" else [d, 8]) for i in (0, 2) for n in "AB"}

    grid = OrderedGrid({**_clients(), 50: Poisoner()}, first=50)
    result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 2}))
    outcome = result.strategy.last_outcome
    assert outcome is not None
    assert sorted(outcome.replied) == ["c0", "c1", "c2", "c3", "c4"]
    assert "c9" in outcome.excluded
    clean = run_federation(InProcessGrid(_clients()), _config(tmp_path, **{"num-server-rounds": 2, "run-name": "clean"}))
    for cid, state in clean.strategy.globals.items():
        for part in ("shared", "same_arch"):
            for key, value in getattr(state, part).items():
                assert torch.equal(getattr(result.strategy.globals[cid], part)[key], value), (cid, key)


@pytest.mark.parametrize("overrides", [{}, {"share-same-arch": False}])
def test_a_schema_tie_is_refused_not_decided_by_arrival(tmp_path: Path, overrides: dict[str, object]) -> None:
    """A tie over arch-b's plain-LoRA schema refuses its two clients, unless that state is not
    aggregated (share-same-arch false): then their P/Q count as everyone's."""
    class OtherR(MockClient):
        def __init__(self, cid: str) -> None:
            super().__init__(cid, "arch-b", 1)
            d = WIDTH["arch-b"]
            self.same_schema = {f"lora.{i}.q_proj.{n}": ([8, d] if n == "A" else [d, 8]) for i in (0, 2) for n in "AB"}

    honest = {n: c for n, c in _clients().items() if c.arch == "arch-a"}
    # arch-b: one client with r = 4, one with r = 8: neither schema has a majority
    handlers = {**honest, 60: OtherR("c8"), 61: MockClient("c7", "arch-b", 1)}
    result = run_federation(InProcessGrid(handlers), _config(tmp_path, **{"num-server-rounds": 1, **overrides}))
    outcome = result.strategy.last_outcome
    assert outcome is not None
    if overrides:
        assert sorted(outcome.replied) == ["c0", "c1", "c4", "c7", "c8"] and not outcome.excluded
    else:
        assert sorted(outcome.replied) == ["c0", "c1", "c4"]
        assert "tie" in outcome.excluded["c7"] and "tie" in outcome.excluded["c8"]


def test_a_reply_replayed_from_an_earlier_round_is_excluded(tmp_path: Path) -> None:
    class Replayer(MockClient):
        def __init__(self) -> None:
            super().__init__("c3", "arch-b", 1)
            self.first: Message | None = None

        def __call__(self, msg: Message) -> Message | None:
            reply = super().__call__(msg)
            if msg.metadata.message_type == MessageType.TRAIN:
                if self.first is None:
                    self.first = reply
                else:
                    return self.first  # round 1's reply again
            return reply

    clients = _clients()
    clients[103] = Replayer()
    result = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 2}))
    outcome = result.strategy.last_outcome
    assert outcome is not None and outcome.server_round == 2
    assert "c3" not in outcome.replied
    assert "stale or foreign reply" in outcome.excluded["c3"] and "group '1'" in outcome.excluded["c3"]


def test_the_norm_bound_from_the_run_config_limits_a_scaled_client(tmp_path: Path) -> None:
    def max_global_norm(result) -> float:  # type: ignore[no-untyped-def]
        return max(float(torch.cat([v.reshape(-1) for v in result.strategy.globals[c].shared.values()]).norm())
                   for c in ("c0", "c1", "c2", "c4"))

    def run(name: str, **extra: object):  # type: ignore[no-untyped-def]
        return run_federation(InProcessGrid(dict(_clients({"c3": "scaled"}))),
                              _config(tmp_path, **{"num-server-rounds": 1, "run-name": name, **extra}))

    assert max_global_norm(run("off")) > 1e4
    assert max_global_norm(run("on", **{"norm-bound": 3.0})) < 100


def test_a_lost_node_is_named_by_the_message_it_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A SuperNode killed mid-round: the SuperLink answers in its place with NODE_UNAVAILABLE from
    its own node id. The ServerApp maps that reply to the client through ``reply_to_message_id``,
    logs which client and which error, and completes the round with the others."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    clients = _clients()
    honest = clients[103]

    def lost(msg: Message) -> Message | None:
        if msg.metadata.message_type != MessageType.TRAIN:
            return honest(msg)
        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node 103 is unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's node id, not the lost node's
        return reply

    grid = InProcessGrid({**clients, 103: lost})
    with caplog.at_level(logging.WARNING):
        result = run_federation(grid, _config(tmp_path, **{"num-server-rounds": 2}))
    assert result.last_round == 2 and "c3" not in result.strategy.last_weight_ids
    assert len(result.strategy.last_weight_ids) == 4
    reason = result.strategy.last_outcome.excluded["c3"]
    assert "NODE_UNAVAILABLE" in reason and "Node 103 is unavailable" in reason
    assert any("client c3 excluded" in r.getMessage() and "NODE_UNAVAILABLE" in r.getMessage() for r in caplog.records)


def test_a_node_whose_handshake_reply_was_lost_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower's SuperNode drops a reply whose push fails (HTTP 500 while the SuperLink's database
    is busy): the node never answers that question. The server asks it again and it joins."""
    from server_app import strategy as strategy_module

    monkeypatch.setattr(strategy_module, "HANDSHAKE_FIRST_WAIT", 0.01)
    clients = _clients()
    asked: list[int] = []

    class LosesFirstAnswer:
        def __init__(self, client: MockClient) -> None:
            self.client = client

        def __call__(self, msg: Message) -> Message | None:
            if msg.metadata.message_type == MessageType.QUERY:
                asked.append(msg.metadata.dst_node_id)
                if asked.count(msg.metadata.dst_node_id) == 1:
                    return None  # lost on the way
            return self.client(msg)

    handlers = {**clients, 101: LosesFirstAnswer(clients[101])}
    with caplog.at_level(logging.WARNING):
        result = run_federation(InProcessGrid(handlers), _config(tmp_path, **{"num-server-rounds": 1}))
    assert asked == [101, 101]  # asked exactly once more
    assert result.strategy.node_of["c1"] == 101
    assert result.strategy.last_outcome is not None and "c1" in result.strategy.last_outcome.replied
    assert any("no answer yet from node(s) 101; asking again" in r.getMessage() for r in caplog.records)


def test_a_question_is_asked_again_on_a_fixed_doubling_schedule_within_the_timeout() -> None:
    """First wait, then twice as long, the last cut to the timeout: a grid that returns early
    (an answer that will not come) is asked a bounded number of times, not in a busy loop."""
    from server_app.strategy import _waits

    assert _waits(300.0, 900.0) == [300.0, 600.0]
    assert _waits(300.0, 2000.0) == [300.0, 600.0, 1100.0]
    assert _waits(300.0, 100.0) == [100.0]
    assert _waits(300.0, 0.0) == [0.0]


@pytest.mark.parametrize(("peerless", "lone_gets_same_arch"), [("self-copy", True), ("keep", False)])
def test_peerless_global_from_the_run_config_decides_what_a_lone_architecture_gets(
        tmp_path: Path, peerless: str, lone_gets_same_arch: bool) -> None:
    """c2 is the only arch-b client: under the reference's self-copy it gets a same-architecture
    global (its own upload) in round 2; under ``peerless-global = "keep"`` none (it never had a
    peer). The paired arch-a clients get theirs either way."""
    specs = [("c0", "arch-a", 0), ("c1", "arch-a", 0), ("c2", "arch-b", 1)]
    clients = {100 + i: MockClient(cid, arch, g) for i, (cid, arch, g) in enumerate(specs)}
    run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 2,
                                                                      "peerless-global": peerless}))
    by_id = {c.client_id: c for c in clients.values()}
    assert (by_id["c2"].same_arch_bytes[2] > 0) is lone_gets_same_arch
    assert by_id["c0"].same_arch_bytes[2] > 0 and by_id["c1"].same_arch_bytes[2] > 0
