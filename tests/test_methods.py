"""The baselines' client side (fedmosaic_core.methods): what each step trains, on which output,
what is uploaded, and the equal-compute budgets; FedSim's logit sum in scoring and generation."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_models_standin import standin_public_samples

import client_app.training as training
from client_app.training import FedMosaicClient, local_optimizer, use_output
from fedmosaic_core.methods import GLOBAL_ALONE, METHODS, MIX, Phase
from fedmosaic_core.models import collate, load_model
from fedmosaic_core.models.collate import generate_answers
from fedmosaic_core.models.scoring import (
    _one_row_per_option,
    _prompt_then_options,
    answer_token_logits,
)
from fedmosaic_core.pqlora import PQLoRAConfig, PQLoRAModel, inject_pqlora
from fedmosaic_flower.config import ConfigError, parse_run_config


def _model(preset: str = "tiny-llama-m", seed: int = 0) -> tuple[PQLoRAModel, Any]:
    torch.manual_seed(seed)
    loaded = load_model(preset, random_init=True)
    model = inject_pqlora(loaded.model, PQLoRAConfig(r=4, alpha=8, dropout=0.0, gate_noise=False, seed=0))
    gen = torch.Generator().manual_seed(seed + 1)
    for branch in ("local", "global"):
        for p in model.branch_parameters(branch).values():
            with torch.no_grad():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))  # two different non-zero branches
    return model, loaded.processor


def test_equal_compute_budgets_scale_local_steps_as_the_reference() -> None:
    """SFT/FedAvg/FedDPA 100, FedSim 75, Ditto 50 (two steps each), FedMosaic 94 iterations."""
    iterations = {name: parse_run_config({"strategy": name, "local-steps": 32}).local_iterations for name in METHODS}
    assert iterations == {"fedmosaic": 30, "fedmosaic-uniform": 30, "fedmosaic-trained-global": 30,
                          "fedmosaic-uniform-trained-global": 30, "fedmosaic-joint-global": 30,
                          "fedavg": 32, "fedavg-dual": 32, "rela-fedavg": 32,
                          "feddpa": 32, "ditto": 16, "fedsim": 24, "local": 32}
    same = {name: parse_run_config({"strategy": name, "local-steps": 32, "equal-compute": False}).local_iterations
            for name in METHODS}
    assert set(same.values()) == {32}
    steps = {name: sum(len(METHODS[name].phases(i, n)) for i in range(n)) for name, n in iterations.items()}
    assert steps["ditto"] == 32 and steps["fedsim"] == 24  # optimiser steps per round
    with pytest.raises(ConfigError, match="'strategy'.*fedsim"):
        parse_run_config({"strategy": "ditto2"})


def test_feddpa_trains_the_global_alone_first_then_local_and_gate() -> None:
    for name in ("feddpa", "fedmosaic-trained-global", "fedmosaic-uniform-trained-global"):
        phases = [METHODS[name].phases(i, 10) for i in range(10)]
        assert phases == [(GLOBAL_ALONE,)] * 5 + [(MIX,)] * 5, name
    trained_global = METHODS["fedmosaic-trained-global"]  # RELA's server, FedDPA's client
    assert (trained_global.aggregation, trained_global.upload, trained_global.task_vectors) == ("fedmosaic", "global", True)
    joint = METHODS["fedmosaic-joint-global"]  # RELA's server; G, L and the gate train on every step
    assert [joint.phases(i, 10) for i in range(10)] == [(Phase(frozenset({"global", "local", "gate"})),)] * 10
    assert (joint.aggregation, joint.upload, joint.task_vectors, joint.evaluate) == ("fedmosaic", "global", True, None)
    ditto = METHODS["ditto"].phases(0, 4)
    assert [p.trains for p in ditto] == [frozenset({"global"}), frozenset({"local"})]
    assert [p.output for p in ditto] == [1.0, 0.0] and ditto[1].proximal == 0.001
    assert {m.name for m in METHODS.values() if m.upload == "global"} == {"feddpa", "ditto", "fedsim",
                                                                        "fedmosaic-trained-global",
                                                                        "fedmosaic-uniform-trained-global",
                                                                        "fedmosaic-joint-global"}
    assert {m.name: m.aggregation for m in METHODS.values()}["fedsim"] == "fedavg"


def test_parameter_groups_with_a_trainable_global_branch() -> None:
    model, _ = _model("tiny-llama-s")
    assert model.parameter_groups()["pq-global"] == [] and model.parameter_groups()["lora-global"] == []
    model.set_global_trainable(True)
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters() if p.requires_grad})
    assert {id(p) for p in groups["pq-global"] + groups["lora-global"]} == {
        id(p) for p in model.branch_parameters("global").values()}
    model.set_global_trainable(False)
    assert not any(p.requires_grad for p in model.branch_parameters("global").values())


def _client(strategy: str) -> FedMosaicClient:
    client = FedMosaicClient.__new__(FedMosaicClient)
    client.config = parse_run_config({"strategy": strategy, "lr-pq": 1e-2, "lr-lora": 1e-2})
    client.client_id = "0"
    return client


def _state(model: PQLoRAModel, client: FedMosaicClient) -> Any:
    model.set_global_trainable(client.method.trains_global)
    optimizer = local_optimizer(model, client.config)
    state = SimpleNamespace(model=model, optimizer=optimizer, grad_norms=[], global_at_start={
        k: p.detach().clone() for k, p in model.branch_parameters("global").items()})
    state.trainable = [p for g in optimizer.param_groups for p in g["params"]]
    state.frozen_in = lambda phase: training.RoundState.frozen_in(state, phase)  # type: ignore[arg-type]
    return state


def _values(model: PQLoRAModel) -> dict[str, torch.Tensor]:
    out = {f"local.{k}": p.detach().clone() for k, p in model.branch_parameters("local").items()}
    out |= {f"global.{k}": p.detach().clone() for k, p in model.branch_parameters("global").items()}
    out |= {f"gate.{k}": v for k, v in model.local_only_state().items()}
    return out


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("strategy", ["ditto", "fedsim", "feddpa", "fedmosaic", "fedmosaic-joint-global"])
def test_each_phase_moves_only_what_it_trains(strategy: str) -> None:
    """Two rounds of each method's phases on one batch: every step moves exactly the parameter
    groups the phase trains, even with AdamW momentum left from earlier steps of other groups."""
    model, processor = _model()
    model.train()
    batch = collate(processor, standin_public_samples(4, seed=1), 256)
    client = _client(strategy)
    state = _state(model, client)
    for step in range(4):
        for phase in client.method.phases(step, 4):
            before = _values(model)
            loss = client.train_step(state, phase, batch, state.frozen_in(phase), step)
            assert math.isfinite(loss)
            assert _moved(before, _values(model)) == set(phase.trains), (strategy, step, phase)
    assert all(n > 0 for n in state.grad_norms)


def test_ditto_adds_the_proximal_gradient_to_the_local_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local step's gradient is the task gradient + 2μ(L − G₀), G₀ the global at the round's start."""
    monkeypatch.setattr(training, "MAX_GRAD_NORM", math.inf)  # compare raw gradients
    model, processor = _model()
    model.train()
    batch = collate(processor, standin_public_samples(4, seed=2), 256)
    client = _client("ditto")
    grads: dict[float, dict[str, torch.Tensor]] = {}
    for mu in (0.0, 0.5):
        state = _state(model, client)
        state.optimizer.step = lambda mu=mu, state=state: grads.__setitem__(mu, {
            k: p.grad.clone() for k, p in state.model.branch_parameters("local").items()})
        phase = Phase(frozenset({"local"}), output=0.0, proximal=mu)
        client.train_step(state, phase, batch, state.frozen_in(phase), 0)
    local = model.branch_parameters("local")
    anchor = model.branch_parameters("global")
    for key in local:
        expected = grads[0.0][key] + 2 * 0.5 * (local[key] - anchor[key]).detach()
        torch.testing.assert_close(grads[0.5][key], expected, rtol=1e-5, atol=1e-6)


def test_fedsim_logit_sum_is_the_sum_of_both_branches_alone() -> None:
    """Training loss and scoring use logits(G alone) + logits(L alone); the shared-prompt scorer
    agrees with one full forward per option on those summed logits."""
    model, processor = _model("tiny-llama-s")
    model.eval()
    samples = standin_public_samples(6, seed=4)
    batch = collate(processor, samples, 256)
    with torch.no_grad():
        parts = []
        for beta in (1.0, 0.0):
            model.set_fixed_beta(beta)
            parts.append(answer_token_logits(model, batch)[0])
        use_output(model, "logit-sum", -1.0)
        summed = answer_token_logits(model, batch)[0]
        torch.testing.assert_close(summed, parts[0] + parts[1], rtol=1e-5, atol=1e-5)
        assert model.fixed_beta is None and model.logit_sum_betas == (1.0, 0.0)
        choices = [[s.answer, "a much longer wrong option", "no"] for s in samples]
        shared = _prompt_then_options(model, processor, samples, choices, 256)
        per_row = _one_row_per_option(model, processor, samples, choices, 256)
    for got, want in zip(shared, per_row, strict=True):
        assert all(math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-4) for g, w in zip(got, want, strict=True))


def test_logit_sum_generation_decodes_greedily_with_left_padding() -> None:
    """With both summed β equal (2 × the same logits) the hand-written loop must reproduce
    ``generate``'s greedy tokens at that β: positions and left padding handled alike."""
    from fedmosaic_core.models.collate import _greedy_logit_sum, collate_for_generation

    model, processor = _model("tiny-llama-s", seed=3)
    model.eval()
    batch = collate_for_generation(processor, standin_public_samples(5, seed=6), 256)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: left padding
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    no_stop = tokenizer.vocab_size + 10  # never generated: every row decodes all 6 tokens
    with torch.no_grad():
        model.set_fixed_beta(0.0)
        expected = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=no_stop)
        model.set_fixed_beta(None)
        model.set_logit_sum((0.0, 0.0))
        got = _greedy_logit_sum(model, model.base_model, batch, 6, tokenizer.pad_token_id, [no_stop])
    assert torch.equal(got, expected[:, batch["input_ids"].shape[1]:])
    assert generate_answers(model, processor, standin_public_samples(2, seed=6), max_new_tokens=3, max_length=256)
    with pytest.raises(ValueError, match="two or more"):
        model.set_logit_sum((1.0,))
