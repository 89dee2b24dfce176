"""A real federated run in one process: the real ClientApp (tiny models, DRAKE-mini 'tiny')
driven by the real round loop on an in-process grid."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flower_fakes import InProcessGrid, run_federation
from flwr.app import Context, Message, RecordDict

from client_app.app import app as client_app
from drake_data.mini.builder import build_drake_mini
from fedmosaic_core.rela import relevance_weights, task_similarity
from fedmosaic_flower import records as proto
from fedmosaic_flower.config import parse_run_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_drake_mini(tmp_path_factory.mktemp("drake") / "mini", seed=0, size="tiny")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path / "cache"))


def _config(data_root: Path, out: Path, **extra: Any):  # type: ignore[no-untyped-def]
    raw = {
        "num-server-rounds": 2, "data-root": str(data_root), "output-dir": str(out), "run-name": "run",
        "pretrained": False, "align-bases": False, "local-steps": 3, "batch-size": 4, "probe-every": 1,
        "rounds-per-task": 1, "eval-max-samples": 2, "eval-others-max-samples": 2, "eval-unseen": False, "min-clients": 2,
        "tv-compression": 1.0,
    }
    raw.update(extra)
    return parse_run_config(raw)


class Recorder:
    """Wraps the real ClientApp for one node and keeps what went in and out."""

    def __init__(self, partition: int, run_config: dict[str, Any]) -> None:
        self.context = Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition},
                               state=RecordDict(), run_config=run_config)
        self.sent: dict[int, Message] = {}
        self.replies: dict[int, Message] = {}

    def __call__(self, msg: Message) -> Message:
        reply = client_app(msg, self.context)
        if msg.metadata.message_type == "train":
            server_round = int(msg.content.config_records[proto.CONFIG]["server-round"])
            self.sent[server_round] = msg
            self.replies[server_round] = reply
        return reply


def _run(config, partitions: list[int], stop_after: int | None = None):  # type: ignore[no-untyped-def]
    recorders = {100 + p: Recorder(p, config.to_flat()) for p in partitions}
    result = run_federation(InProcessGrid(dict(recorders)), config, stop_after=stop_after)
    return result, recorders


@pytest.mark.slow
def test_three_clients_receive_their_own_relevance_weighted_globals(data_root: Path, tmp_path: Path) -> None:
    config = _config(data_root, tmp_path / "runs")
    result, recorders = _run(config, [0, 1, 2])
    assert result.last_round == 2
    ids = [str(p) for p in (0, 1, 2)]
    vectors = [proto.decode_task_vector(recorders[100 + int(c)].replies[1].content.array_records[proto.TASK_VECTOR]) for c in ids]
    weights = relevance_weights(task_similarity(vectors), tau=config.tau)
    locals_ = [proto.decode_state(recorders[100 + int(c)].replies[1].content.array_records[proto.LOCAL_SHARED], "l") for c in ids]
    received = [proto.decode_state(recorders[100 + int(c)].sent[2].content.array_records[proto.GLOBAL_SHARED], "g") for c in ids]
    for i in range(3):
        for key in locals_[i]:
            expected = sum(weights[i, j] * locals_[j][key] for j in range(3))
            torch.testing.assert_close(received[i][key], expected, rtol=1e-5, atol=1e-7)
    # three different global states (each client's own G_i), non-zero after training
    flat = [torch.cat([r[k].flatten() for k in sorted(r)]) for r in received]
    assert all(float(f.abs().sum()) > 0 for f in flat)
    assert not torch.allclose(flat[0], flat[1]) and not torch.allclose(flat[1], flat[2])
    assert np.allclose(np.diag(weights), 0.0)
    # clients of different architectures share P/Q; client 0's preset has no plain-LoRA layers to share
    assert len(recorders[100].sent[2].content.array_records[proto.GLOBAL_SAME_ARCH]) == 0
    rows = [r for r in result.rows if r["round"] == 2]
    assert all("others" in r["scores"] for r in rows)
    # the gates' mean β while training, per layer block: about 0.5 in round 1 (zero gates resting
    # while there is no global; only the gate noise moves β), then wherever the gates go
    first = [r for r in result.rows if r["round"] == 1]
    assert all(abs(r[f"beta_block_{k}"] - 0.5) < 0.02 for r in first for k in range(4))
    assert all(0.0 < r[f"beta_block_{k}"] < 1.0 for r in rows for k in range(4))


@pytest.mark.slow
def test_rela_fedavg_sends_each_client_its_relevance_mix_with_itself_in_it(data_root: Path, tmp_path: Path) -> None:
    """``rela-fedavg``: client i gets Σ_j w_ij L_j over every j, i included (s_ii = 1), whatever
    ``include-self`` says, and trains it further as its one adapter."""
    config = _config(data_root, tmp_path / "runs", strategy="rela-fedavg")
    assert not config.include_self
    result, recorders = _run(config, [0, 1, 2])
    assert result.last_round == 2
    ids = (0, 1, 2)
    vectors = [proto.decode_task_vector(recorders[100 + c].replies[1].content.array_records[proto.TASK_VECTOR]) for c in ids]
    weights = relevance_weights(task_similarity(vectors), tau=config.tau, include_self=True)
    assert np.all(np.diag(weights) > weights.max(axis=1) - 1e-12)  # each client is its own most relevant
    locals_ = [proto.decode_state(recorders[100 + c].replies[1].content.array_records[proto.LOCAL_SHARED], "l") for c in ids]
    received = [proto.decode_state(recorders[100 + c].sent[2].content.array_records[proto.GLOBAL_SHARED], "g") for c in ids]
    for i in range(3):
        for key in locals_[i]:
            expected = sum(weights[i, j] * locals_[j][key] for j in range(3))
            torch.testing.assert_close(received[i][key], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_resume_gives_the_same_next_round_states(data_root: Path, tmp_path: Path) -> None:
    full, _ = _run(_config(data_root, tmp_path / "a", **{"num-server-rounds": 3}), [0, 2])
    _run(_config(data_root, tmp_path / "b", **{"num-server-rounds": 3}), [0, 2], stop_after=2)
    resumed, _ = _run(_config(data_root, tmp_path / "b", **{"num-server-rounds": 3}, resume=True), [0, 2])
    assert resumed.last_round == 3
    for cid, state in full.strategy.globals.items():
        for key, value in state.shared.items():
            torch.testing.assert_close(resumed.strategy.globals[cid].shared[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_one_clientapp_process_serves_two_runs_with_their_own_configs(data_root: Path, tmp_path: Path) -> None:
    """The same ClientApp (same process, same cached models) serves run A with local-steps 2,
    then run B with local-steps 5: run B trains 5 steps (the stale-config bug trained 2)."""
    steps = {}
    for name, local_steps in (("run-a", 2), ("run-b", 5)):
        config = _config(data_root, tmp_path / "runs", **{"run-name": name, "local-steps": local_steps,
                                                           "num-server-rounds": 1, "min-clients": 1})
        recorder = Recorder(0, config.to_flat())
        run_federation(InProcessGrid({100: recorder}), config)
        steps[name] = recorder.replies[1].content.metric_records[proto.METRICS]["train-steps"]
    assert steps == {"run-a": 2.0, "run-b": 5.0}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "steps"), [("feddpa", 4), ("ditto", 4), ("fedsim", 3)])
def test_global_training_baselines_upload_their_global_and_get_the_group_mean(
    data_root: Path, tmp_path: Path, strategy: str, steps: int
) -> None:
    """FedDPA, Ditto and FedSim train the global branch on the client and upload it; the server
    sends back the same-architecture group's mean (clients 0 and 1 share tiny-llama-s). Their
    optimiser steps follow the equal-compute budgets (local-steps 4: Ditto 2 × 2, FedSim 3)."""
    config = _config(data_root, tmp_path / "runs", strategy=strategy, **{"local-steps": 4})
    result, recorders = _run(config, [0, 1])
    assert result.last_round == 2
    uploads = [recorders[100 + c].replies[1].content.array_records for c in (0, 1)]
    for part in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH):
        sent = [proto.decode_state(u[part], "up") for u in uploads]
        received = proto.decode_state(recorders[100].sent[2].content.array_records[part.replace("local", "global")], "g")
        assert set(received) == set(sent[0]) == set(sent[1])  # tiny-llama-s: no plain-LoRA layers
        for key in sent[0]:
            torch.testing.assert_close(received[key], (sent[0][key] + sent[1][key]) / 2, rtol=1e-6, atol=1e-7)
        if part == proto.LOCAL_SHARED:  # the global branch trained from 0
            assert sent[0] and all(float(v.abs().sum()) > 0 for u in sent for v in u.values())
    metrics = [recorders[100 + c].replies[r].content.metric_records[proto.METRICS] for c in (0, 1) for r in (1, 2)]
    assert all(m["train-steps"] == steps and math.isfinite(m["train-loss"]) for m in metrics)
    assert all(r["scores"]["self"] for r in result.rows)


@pytest.mark.slow
def test_fedmosaic_trained_global_uploads_its_global_and_gets_the_rela_mix(data_root: Path, tmp_path: Path) -> None:
    """``fedmosaic-trained-global`` trains the global branch first and uploads it with a task
    vector; RELA mixes the others' (w_ii = 0): with two clients each gets the other's branch."""
    config = _config(data_root, tmp_path / "runs", strategy="fedmosaic-trained-global", **{"local-steps": 4})
    result, recorders = _run(config, [0, 1])
    assert result.last_round == 2
    uploads = [recorders[100 + c].replies[1].content.array_records for c in (0, 1)]
    assert all(proto.TASK_VECTOR in u for u in uploads)
    for part in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH):
        sent = [proto.decode_state(u[part], "up") for u in uploads]
        for me, other in ((0, 1), (1, 0)):
            received = proto.decode_state(
                recorders[100 + me].sent[2].content.array_records[part.replace("local", "global")], "g")
            assert set(received) == set(sent[other])
            for key, value in sent[other].items():
                torch.testing.assert_close(received[key], value, rtol=1e-6, atol=1e-7)
        if part == proto.LOCAL_SHARED:  # the global branch trained from 0
            assert sent[0] and all(float(v.abs().sum()) > 0 for u in sent for v in u.values())
    assert all(r["scores"]["self"] for r in result.rows)


@pytest.mark.parametrize("strategy", ["fedavg", "rela-fedavg", "fedavg-dual", "fedmosaic"])
def test_fedavg_replaces_the_local_adapter_and_the_others_fill_the_global_branch(strategy: str) -> None:
    """FedAvg keeps one adapter: the group mean overwrites the local branch and the global branch
    stays 0. The dual-branch strategies put what the server sends into the frozen global branch."""
    from types import SimpleNamespace

    from client_app.training import FedMosaicClient
    from fedmosaic_core.models import load_model
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

    model = inject_pqlora(load_model("tiny-llama-m", random_init=True).model,
                          PQLoRAConfig(r=4, alpha=8, dropout=0.0, gate_noise=False, seed=0))
    gen = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in model.shared_state().items()}
    same_arch = {k: torch.randn(v.shape, generator=gen) for k, v in model.same_arch_state().items()}
    assert same_arch, "tiny-llama-m has plain-LoRA layers"
    local_before = {**model.shared_state(), **model.same_arch_state()}
    global_before = {**model.shared_state("global"), **model.same_arch_state("global")}
    client = FedMosaicClient.__new__(FedMosaicClient)
    client.config = parse_run_config({"strategy": strategy})
    client.load_global(SimpleNamespace(model=model), shared, same_arch)  # type: ignore[arg-type]
    local = {**model.shared_state(), **model.same_arch_state()}
    global_ = {**model.shared_state("global"), **model.same_arch_state("global")}
    sent = {**shared, **same_arch}
    for key, value in sent.items():
        if strategy in ("fedavg", "rela-fedavg"):
            assert torch.equal(local[key], value) and torch.equal(global_[key], global_before[key])
        else:
            assert torch.equal(global_[key], value) and torch.equal(local[key], local_before[key])
    resting = len(model.gates_without_global())
    assert resting == (len(model.adapted_modules) if strategy in ("fedavg", "rela-fedavg") else 0)  # G = 0, β rests


@pytest.mark.parametrize("strategy", ["fedavg", "fedmosaic"])
def test_an_empty_global_from_the_server_keeps_what_the_client_has(strategy: str) -> None:
    """The server sends empty parts to a client that has nothing new (no peer yet under
    ``peerless-global = keep``; a round with fewer than 2 valid clients): the client goes on with
    the adapter it has instead of failing the round."""
    from types import SimpleNamespace

    from client_app.training import FedMosaicClient
    from fedmosaic_core.models import load_model
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

    model = inject_pqlora(load_model("tiny-llama-m", random_init=True).model,
                          PQLoRAConfig(r=4, alpha=8, dropout=0.0, gate_noise=False, seed=0))
    gen = torch.Generator().manual_seed(2)
    model.load_global_state(shared={k: torch.randn(v.shape, generator=gen) for k, v in model.shared_state().items()})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    client = FedMosaicClient.__new__(FedMosaicClient)
    client.config = parse_run_config({"strategy": strategy})
    state = SimpleNamespace(model=model)
    client.load_global(state, {}, {})  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert set(state.global_at_start) == set(model.branch_parameters("global"))


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "uploaded"), [
    ({"strategy": "local"}, set()),
    ({"share-same-arch": False}, {proto.LOCAL_SHARED}),
])
def test_the_real_client_uploads_only_the_states_the_server_aggregates(
    data_root: Path, tmp_path: Path, overrides: dict[str, Any], uploaded: set[str]
) -> None:
    """``local`` aggregates nothing, so its clients upload no adapter state; the P/Q-only ablation
    uploads P/Q and not the plain-LoRA state. Both still report their scores every round."""
    result, recorders = _run(_config(data_root, tmp_path / "runs", **overrides), [0, 1])
    assert result.last_round == 2
    for recorder in recorders.values():
        for reply in recorder.replies.values():
            states = set(reply.content.array_records) & {proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH}
            assert states == uploaded
    assert len(result.rows) == 4 and all(r["scores"]["self"] for r in result.rows)


@pytest.mark.slow
def test_fixed_beta_ablation_fixes_every_gate(data_root: Path, tmp_path: Path) -> None:
    """``fixed-beta`` 0.5: no gate is learned, so no learned β is logged; -1 logs them again in the
    same processes (the adapted models are cached across runs)."""
    fixed = _config(data_root, tmp_path / "runs", **{"fixed-beta": 0.5, "num-server-rounds": 1})
    result, _ = _run(fixed, [0, 1])
    assert result.rows and not any(k.startswith("beta_block_") for r in result.rows for k in r)
    learned = _config(data_root, tmp_path / "runs2", **{"num-server-rounds": 1})
    result, _ = _run(learned, [0, 1])
    assert all("beta_block_0" in r for r in result.rows)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapters(data_root: Path, tmp_path: Path) -> None:
    """``gradient-checkpointing`` recomputes activations in backward: the clients' uploaded states
    match a run without it, and only the run that asked for it has it on (its own cached model)."""
    from client_app.resources import get_resources

    plain = _config(data_root, tmp_path / "runs", **{"num-server-rounds": 1})
    recomputed = _config(data_root, tmp_path / "runs2", **{"num-server-rounds": 1, "gradient-checkpointing": True})
    _, plain_recorders = _run(plain, [0, 1])
    _, recomputed_recorders = _run(recomputed, [0, 1])
    for node in (100, 101):
        for key in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH):
            a = proto.decode_state(plain_recorders[node].replies[1].content.array_records[key], key)
            b = proto.decode_state(recomputed_recorders[node].replies[1].content.array_records[key], key)
            assert a.keys() == b.keys() and (a or key == proto.LOCAL_SAME_ARCH)
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    flags = {key[-1]: adapted.model.is_activation_checkpointing
             for key, adapted in get_resources(recomputed).models.items()}
    assert flags == {False: False, True: True}


@pytest.mark.slow
def test_local_training_clips_the_gradient_norm_to_one(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every optimiser step sees adapter gradients of total norm ≤ 1.0 (the reference's Trainer
    clips to 1.0), while the norms logged before clipping go above it."""
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    result, _ = _run(_config(data_root, tmp_path / "runs", **{"num-server-rounds": 1, "local-steps": 4}), [0, 1])
    assert len(seen) == 8 and max(seen) <= 1.0 + 1e-5
    assert max(r["grad_norm_max"] for r in result.rows) > 1.0


@pytest.mark.slow
def test_a_client_that_missed_a_round_goes_on_from_its_last_state(data_root: Path, tmp_path: Path) -> None:
    """Client 1's node is lost in round 2 (no reply, nothing saved). In round 3 it trains again from
    the state it saved after round 1 (its replay memory holds rounds 1 and 3's data, not a fresh
    start's), and the server told it which round that was."""
    config = _config(data_root, tmp_path / "runs", **{"num-server-rounds": 3})
    recorders = {100 + p: Recorder(p, config.to_flat()) for p in (0, 1)}
    lost = recorders[101]

    def lost_in_round_2(msg: Message) -> Message | None:
        if msg.metadata.message_type == "train" and int(msg.content.config_records[proto.CONFIG]["server-round"]) == 2:
            return None
        return lost(msg)

    result = run_federation(InProcessGrid({100: recorders[100], 101: lost_in_round_2}), config)
    assert result.last_round == 3
    clients_by_round = {r: sorted(str(row["client"]) for row in result.rows if row["round"] == r) for r in (1, 2, 3)}
    assert clients_by_round == {1: ["0", "1"], 2: ["0"], 3: ["0", "1"]}
    assert int(lost.sent[3].content.config_records[proto.CONFIG]["last-round"]) == 1
    assert int(recorders[100].sent[3].content.config_records[proto.CONFIG]["last-round"]) == 2
    replay = {r: lost.replies[r].content.metric_records[proto.METRICS]["replay-size"] for r in (1, 3)}
    assert replay[3] > replay[1]  # round 1's memory plus a new chunk: it went on, it did not restart


def test_client_state_store_loads_the_newest_state_and_refuses_lost_state(tmp_path: Path) -> None:
    from client_app.state import ClientSnapshot, ClientStateError, ClientStateStore

    store = ClientStateStore(tmp_path, "run", "7")
    assert store.load_latest(5) is None  # never completed a round: a fresh start
    with pytest.raises(ClientStateError, match="recorded round 2 .* it has no saved state"):
        store.load_latest(5, at_least=2)
    for r in (1, 3):
        store.save(r, ClientSnapshot({"x": torch.full((2,), float(r))}, {"round": r}))
    assert store.saved_rounds() == [1, 3]
    assert store.load_latest(2).meta["round"] == 1  # never newer than the round before this one
    assert store.load_latest(4, at_least=3).meta["round"] == 3
    with pytest.raises(ClientStateError, match="newest state is from round 3"):
        store.load_latest(9, at_least=5)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_export_writes_a_clients_personal_model_that_reloads(data_root: Path, tmp_path: Path, quantization: str) -> None:
    """`fedmosaic export` of a finished run's Qwen2 client (exported as the equivalent Llama
    decoder) and the clear errors of bad input; a failed export leaves nothing behind."""
    import json

    from typer.testing import CliRunner

    from fedmosaic_cli.main import app as cli

    config = _config(data_root, tmp_path / "runs", **{"num-server-rounds": 1, "quantization": quantization})
    _run(config, [0, 3])
    runner = CliRunner()

    def export(*args: str) -> Any:
        return runner.invoke(cli, ["export", "--run", str(config.run_dir), *args])

    out = tmp_path / "personal"
    result = export("--client", "3", "--out", str(out), "--beta-samples", "4", "--eval-samples", "4")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export.json").read_text())
    assert report["round"] == 1 and report["architecture"] == "llama" and report["base"].endswith("base")
    assert report["checks"]["checkpoint_max_abs_logit_diff"] <= 1e-4
    assert report["checks"]["peft_max_abs_logit_diff"] <= 1e-4
    assert set(report["self_gated"]) == set(report["self_merged"]) == {"EasyVQA-0", "EasyVQA-1"}
    assert 0.0 < report["beta"]["min"] <= report["beta"]["max"] < 1.0
    for name in ("model/config.json", "model/model.safetensors", "peft-adapter/adapter_model.safetensors", "base/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "peft-adapter/adapter_config.json").read_text())["base_model_name_or_path"] == report["base"]
    before = sorted(p.name for p in out.rglob("*"))

    for args, message in (
        (["--client", "3", "--out", str(out)], "exists and is not an empty folder"),
        (["--client", "99", "--out", str(tmp_path / "x")], "client '99' is not in scenario"),
        (["--client", "1", "--out", str(tmp_path / "x")], "client 1 has no saved round"),
    ):
        failed = export(*args)
        assert failed.exit_code == 2 and message in failed.output, failed.output
    failed = runner.invoke(cli, ["export", "--run", str(tmp_path / "nowhere"), "--client", "3", "--out", str(tmp_path / "x")])
    assert failed.exit_code == 2 and "is not a run folder" in failed.output, failed.output
    assert not (tmp_path / "x").exists() and sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.slow
def test_a_lost_train_reply_is_asked_again_and_answered_from_disk(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client 1 trains round 1 and saves its state, but its reply is lost on the way. The server
    asks again; the client answers from the state it saved, without training the round twice,
    and takes part in round 1's aggregation and in round 2."""
    from client_app.training import FedMosaicClient

    trained: list[tuple[str, int]] = []
    real_train = FedMosaicClient.train

    def counting(self, state, server_round):  # type: ignore[no-untyped-def]
        trained.append((self.client_id, server_round))
        return real_train(self, state, server_round)

    monkeypatch.setattr(FedMosaicClient, "train", counting)
    config = _config(data_root, tmp_path / "runs")
    recorders = {100 + p: Recorder(p, config.to_flat()) for p in (0, 1)}
    lost = recorders[101]
    dropped: list[Message] = []

    def reply_lost_once(msg: Message) -> Message | None:
        reply = lost(msg)
        if msg.metadata.message_type == "train" and not dropped:
            dropped.append(reply)
            return None
        return reply

    result = run_federation(InProcessGrid({100: recorders[100], 101: reply_lost_once}), config)
    assert result.last_round == 2 and len(dropped) == 1
    assert sorted(trained) == [("0", 1), ("0", 2), ("1", 1), ("1", 2)]  # every round trained once
    assert {(r["round"], str(r["client"])) for r in result.rows} == {(1, "0"), (1, "1"), (2, "0"), (2, "1")}
    again = lost.replies[1].content  # the answer to the repeated question
    first = dropped[0].content
    for key in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH):
        a, b = proto.decode_state(first.array_records[key], key), proto.decode_state(again.array_records[key], key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(proto.decode_task_vector(first.array_records[proto.TASK_VECTOR]),
                          proto.decode_task_vector(again.array_records[proto.TASK_VECTOR]))
    assert dict(first.metric_records[proto.METRICS]) == dict(again.metric_records[proto.METRICS])


def test_a_saved_round_is_answered_again_only_for_the_same_global_state(data_root: Path, tmp_path: Path) -> None:
    from client_app.resources import get_resources
    from client_app.training import FedMosaicClient

    config = _config(data_root, tmp_path / "runs", **{"num-server-rounds": 1, "min-clients": 1})
    run_federation(InProcessGrid({100: Recorder(0, config.to_flat())}), config)
    client = FedMosaicClient(config, get_resources(config), "0", config.run_dir / "clients")
    name = config.resolved_run_name
    assert client.saved_result(1, name, None, None, run_id=1) is not None  # round 1 had no global
    assert client.saved_result(1, name, {"pq.0.q_proj.Q": torch.zeros(4)}, {}, run_id=1) is None
    assert client.saved_result(1, name, None, None, run_id=2) is None  # a new run of the same name trains
    assert client.saved_result(2, name, None, None, run_id=1) is None  # never trained


def test_a_scenario_whose_client_ids_are_not_0_to_n_runs_in_simulation(data_root: Path, tmp_path: Path) -> None:
    """Simulation numbers its nodes 0 … n − 1; a scenario of clients 4 and 7 (say, one skill group
    cut out of a larger one) runs with partition 0 as client 4 and partition 1 as client 7."""
    clients = json.loads((data_root / "scenario-two-families.json").read_text())
    subset = [c for c in clients if c["client_id"] in (4, 7)]
    scenario = tmp_path / "scenario-two-of-nine.json"
    scenario.write_text(json.dumps(subset))
    config = _config(data_root, tmp_path / "runs", **{"num-server-rounds": 1, "scenario": str(scenario)})
    result, _ = _run(config, [0, 1])
    assert result.last_round == 1
    tasks = {c["client_id"]: {f"{t['dataset']}-{t['subset_id']}" for t in c["datasets"]} for c in subset}
    rows = {r["client"]: r for r in result.rows}
    assert sorted(rows) == ["4", "7"]
    for client, row in rows.items():
        assert set(row["scores"]["self"]) <= tasks[int(client)] and row["scores"]["self"]
    with pytest.raises(ValueError, match=r"partition-id 2 is out of range: .*has 2 clients"):
        client_app(Message(RecordDict(), dst_node_id=102, message_type="query"),
                   Context(run_id=1, node_id=102, node_config={"partition-id": 2}, state=RecordDict(),
                           run_config=config.to_flat()))
