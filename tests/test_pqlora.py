"""PQ-LoRA adapter: math, gradients, state views, validation, save/load, merge."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedmosaic_core.pqlora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterStateError,
    DualLoRALinear,
    GateContext,
    PQLoRAConfig,
    PQLoRALinear,
    PQLoRAModel,
    inject_pqlora,
    load_pqlora,
    orthonormal_bases,
    pq_layer_indices,
)
from fedmosaic_core.pqlora.model import prompt_mask

VOCAB = 96


def text_config(cls: Any, hidden: int = 32, layers: int = 5) -> Any:
    return cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
    )


def tiny_llama(hidden: int = 32, layers: int = 5) -> LlamaForCausalLM:
    return LlamaForCausalLM(text_config(LlamaConfig, hidden, layers)).eval()


def tiny_llava(text_cls: Any, hidden: int, layers: int) -> LlavaForConditionalGeneration:
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        text_config=text_config(text_cls, hidden, layers),
        image_token_id=VOCAB - 1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


def cfg(**kwargs: Any) -> PQLoRAConfig:
    return PQLoRAConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **kwargs})


def make_batch(batch: int = 2, tokens: int = 9, pad: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded batch: the last sample has ``pad`` padding tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB - 2, (batch, tokens), generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[-1, tokens - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def randn_like_state(state: dict[str, torch.Tensor], seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


def randomize(w: PQLoRAModel, gates: bool = False) -> None:
    """Give both branches (and optionally the gates) non-zero values through the public API."""
    w.load_local_state(
        shared=randn_like_state(w.shared_state(), 1),
        same_arch=randn_like_state(w.same_arch_state(), 2),
        local_only=randn_like_state(w.local_only_state(), 3, 1.0) if gates else None,
    )
    w.load_global_state(
        shared=randn_like_state(w.shared_state("global"), 4),
        same_arch=randn_like_state(w.same_arch_state("global"), 5),
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def snapshot(w: PQLoRAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in w.state_dict().items()}


def assert_same_state(w: PQLoRAModel, before: dict[str, torch.Tensor]) -> None:
    after = w.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# -- layer rule and config -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "blocks", "expected"),
    [(16, 4, [3, 7, 11, 15]), (28, 4, [6, 13, 20, 27]), (4, 4, [0, 1, 2, 3]),
     (6, 4, [0, 1, 2, 5]), (5, 2, [1, 4]), (3, 1, [2])],
)
def test_pq_layer_indices_rule(layers: int, blocks: int, expected: list[int]) -> None:
    assert pq_layer_indices(layers, blocks) == expected


@pytest.mark.parametrize(("layers", "blocks"), [(3, 4), (0, 4), (4, 0), (2.0, 1)])
def test_pq_layer_indices_rejects(layers: Any, blocks: Any) -> None:
    with pytest.raises(ValueError, match="num_"):
        pq_layer_indices(layers, blocks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r": 0}, "r must be a positive integer, got 0"), ({"r": -3}, "got -3"),
     ({"r": 2.5}, "got 2.5"), ({"lora_r": 0}, "lora_r"), ({"alpha": 0}, "alpha"),
     ({"alpha": float("nan")}, "alpha"), ({"dropout": 1.0}, "dropout"),
     ({"target_modules": ()}, "target_modules"), ({"target_modules": "q_proj"}, "target_modules"),
     ({"target_modules": ("q_proj", "q_proj")}, "duplicates"), ({"num_blocks": 0}, "num_blocks"),
     ({"seed": -1}, "seed"), ({"gate_noise": 1}, "gate_noise")],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PQLoRAConfig(**kwargs)


def test_config_defaults_and_json_roundtrip() -> None:
    default = PQLoRAConfig()
    assert default.target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    assert default.lora_r == default.r and default.num_blocks == 4
    custom = PQLoRAConfig(r=8, alpha=16, lora_r=4, target_modules=("q_proj",), seed=7, gate_noise=False)
    assert PQLoRAConfig.from_json(custom.to_json()) == custom
    assert custom.scaling == 2.0 and custom.lora_scaling == 4.0
    with pytest.raises(ValueError, match="unknown field"):
        PQLoRAConfig.from_dict({"r": 4, "rank": 4})


# -- the adapter's math ------------------------------------------------------------------------
def test_pq_layer_computes_design_formula() -> None:
    """h = W·x + β·G(x) + (1−β)·L(x), branch(x) = s·((x·Aᵀ)·P + Q)·Bᵀ with x a row vector."""
    base = nn.Linear(12, 10)
    a, b = orthonormal_bases(12, 10, 3, seed=0, block=0, module="q_proj")
    ctx = GateContext(fixed_beta=0.3)
    layer = PQLoRALinear(base, ctx, r=3, alpha=6.0, A=a, B=b)
    g = torch.Generator().manual_seed(0)
    p_l, p_g = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)  # not diagonal
    q_l, q_g = torch.randn(3, generator=g), torch.randn(3, generator=g)
    with torch.no_grad():
        layer.pq_P["local"].copy_(p_l), layer.pq_P["global"].copy_(p_g)
        layer.pq_Q["local"].copy_(q_l), layer.pq_Q["global"].copy_(q_g)
    x = torch.randn(2, 5, 12, generator=g)
    s = 2.0

    def branch(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return s * ((x @ a.T) @ p + q) @ b.T

    expected = base(x) + 0.3 * branch(p_g, q_g) + 0.7 * branch(p_l, q_l)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # dense form: ΔW = s·B·P_βᵀ·A, Δb = s·B·Q_β (the reference's diag(P) would fail this)
    delta_w, delta_b = layer.delta_weight_and_bias(0.3)
    torch.testing.assert_close(x @ delta_w.T + delta_b, expected - base(x), rtol=1e-5, atol=1e-6)


def test_update_span_has_dimension_r_squared() -> None:
    """With orthonormal A/B the updates {s·B·Pᵀ·A} span an r²-dimensional space (Theorem 1)."""
    r, d_in, d_out = 3, 10, 12
    a, b = orthonormal_bases(d_in, d_out, r, seed=0, block=1, module="o_proj")
    torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(r), atol=1e-6, rtol=0)
    layer = PQLoRALinear(nn.Linear(d_in, d_out), GateContext(), r=r, alpha=float(r), A=a, B=b)
    columns = []
    for i in range(r):
        for j in range(r):
            unit = torch.zeros(r, r)
            unit[i, j] = 1.0
            with torch.no_grad():
                layer.pq_P["local"].copy_(unit)
            delta_w, _ = layer.delta_weight_and_bias(0.0)  # the layer's own dense update
            torch.testing.assert_close(delta_w, b @ unit.T @ a)
            columns.append(delta_w.reshape(-1))
    span = torch.stack(columns, dim=1).double()  # (d_out·d_in) × r²
    assert int(torch.linalg.matrix_rank(span)) == r * r
    # a rank-deficient B collapses the span: the rank check can fail
    b_bad = b.clone()
    b_bad[:, 1] = b_bad[:, 0]
    bad = torch.stack([(b_bad @ u.T @ a).reshape(-1) for u in torch.eye(r * r).reshape(-1, r, r)], 1)
    assert int(torch.linalg.matrix_rank(bad.double())) < r * r


def test_adapter_output_is_exactly_zero_at_init() -> None:
    model = tiny_llama(layers=5)
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    wrapped = inject_pqlora(model, cfg(gate_noise=True))
    assert len({type(i.adapter) for i in wrapped.adapted_modules}) == 2  # PQ and plain LoRA
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, reference)
        wrapped.train()  # gate noise changes β, but both branches are exactly 0
        assert torch.equal(wrapped(**batch).logits, reference)


def test_gate_noise_is_the_mean_of_per_token_noise() -> None:
    """The reference adds N(0, σ²), σ = ln 2 + 1e-5, to every token's gate logit and then
    averages: the pooled logit's noise has std σ/√T for T prompt tokens (padding excluded)."""
    torch.manual_seed(0)
    layer = DualLoRALinear(nn.Linear(6, 4), GateContext(), r=2, alpha=2.0, gate_noise=True).train()
    with torch.no_grad():
        layer.gate.weight.normal_()
    draws = 20000
    x = torch.randn(1, 16, 6).expand(draws, -1, -1)
    mask = torch.zeros(draws, 16, dtype=torch.long)
    mask[: draws // 2, :4] = 1  # T = 4
    mask[draws // 2 :, :16] = 1  # T = 16
    layer.context.prompt_mask = mask
    with torch.no_grad():
        logit = torch.logit(layer.gate_beta(x).double())
        clean = layer.eval().gate_beta(x).double()[0]  # noise-free, over the first 4 tokens
    sigma = math.log(2.0) + 1e-5
    for rows, tokens in ((slice(0, draws // 2), 4), (slice(draws // 2, draws), 16)):
        std = float(logit[rows].std())
        assert abs(std - sigma / math.sqrt(tokens)) < 0.03 * sigma / math.sqrt(tokens), (tokens, std)
    assert abs(float(logit[: draws // 2].mean()) - float(torch.logit(clean))) < 0.01
    layer.context.prompt_mask = None  # no mask: all T = 16 tokens
    layer.train()
    with torch.no_grad():
        assert abs(float(torch.logit(layer.gate_beta(x).double()).std()) - sigma / 4) < 0.03 * sigma / 4


def test_trained_beta_is_logged_per_layer_block() -> None:
    """Mean β over training-mode forwards, per layer block (a PQ layer ends each block; plain-LoRA
    layers count in their block); eval forwards and a fixed β are not counted; reset empties it."""
    wrapped = inject_pqlora(tiny_llama(layers=8), cfg(gate_noise=False))
    batch = make_batch()
    assert sorted({i.block for i in wrapped.adapted_modules if i.block is not None}) == [0, 1, 2, 3]
    with torch.no_grad():
        wrapped.train()
        wrapped(**batch)
        assert wrapped.trained_beta_by_block(reset=False) == {k: 0.5 for k in range(4)}  # zero gates
        for item in wrapped.adapted_modules:
            if item.layer in (6, 7):  # block 3
                item.adapter.gate.weight.fill_(0.05)
        wrapped(**batch)
        means = wrapped.trained_beta_by_block(reset=True)
        assert means[0] == means[1] == means[2] == 0.5 and means[3] != 0.5 and 0.0 < means[3] < 1.0
        assert wrapped.trained_beta_by_block() == {}  # reset
        wrapped.eval()
        wrapped(**batch)
        wrapped.train()
        wrapped.set_fixed_beta(0.9)
        wrapped(**batch)
        assert wrapped.trained_beta_by_block() == {}


def test_gate_masks_padding_tokens() -> None:
    layer = DualLoRALinear(nn.Linear(6, 4), GateContext(), r=2, alpha=2.0).eval()  # no noise
    with torch.no_grad():
        layer.gate.weight.normal_()
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    layer.context.prompt_mask = mask
    beta = layer.gate_beta(x)
    w = layer.gate.weight[0]
    expected = torch.sigmoid(torch.stack([(x[0] @ w).mean(), (x[1, :2] @ w).mean()]))
    torch.testing.assert_close(beta, expected)
    layer.context.prompt_mask = None  # no mask: plain mean over all tokens
    torch.testing.assert_close(layer.gate_beta(x), torch.sigmoid((x @ w).mean(dim=1)))
    layer.context.prompt_mask = torch.ones(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="gate prompt mask of shape"):
        layer.gate_beta(x)


def test_prompt_mask_leaves_out_padding_and_answer_tokens() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, -100, 9]])
    assert prompt_mask(mask, labels).tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert prompt_mask(None, labels).tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 0]]
    assert prompt_mask(mask, None) is mask and prompt_mask(None, None) is None
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 4\) and labels of shape \(2, 5\)"):
        prompt_mask(mask[:, :4], labels)


def test_the_answer_cannot_reach_earlier_positions_through_the_gate() -> None:
    """Causality through the gate: with learned gates, the logits up to the answer (the ones
    that predict it) do not change when the answer tokens do, in both the wrapper's forward and
    the answer-positions-only path."""
    from fedmosaic_core.models.scoring import answer_token_logits

    wrapped = inject_pqlora(tiny_llama(layers=4), cfg(gate_noise=False))
    randomize(wrapped, gates=True)
    batch = make_batch(batch=2, tokens=9, pad=0)
    prompt = 6
    outs, fast = [], []
    for seed in (0, 1):
        ids = batch["input_ids"].clone()
        ids[:, prompt:] = torch.randint(0, VOCAB - 2, (2, 9 - prompt), generator=torch.Generator().manual_seed(seed))
        labels = ids.clone()
        labels[:, :prompt] = -100
        with torch.no_grad():
            outs.append(wrapped(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).logits)
            fast.append(answer_token_logits(wrapped, {"input_ids": ids, "attention_mask": batch["attention_mask"],
                                                      "labels": labels})[0])
    torch.testing.assert_close(outs[0][:, :prompt], outs[1][:, :prompt], rtol=0, atol=0)
    first_answer_rows = [0, 9 - prompt]  # each sample's first answer token is predicted at prompt-1
    torch.testing.assert_close(fast[0][first_answer_rows], fast[1][first_answer_rows], rtol=0, atol=0)
    torch.testing.assert_close(fast[0], torch.cat([o[r, prompt - 1 : -1] for o in outs[:1] for r in range(2)]),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0][:, prompt:], outs[1][:, prompt:])  # the answer itself differs


def test_model_forward_passes_attention_mask_to_gates() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=4), cfg())
    randomize(wrapped, gates=True)
    batch = make_batch(batch=2, tokens=9, pad=3)
    real = 6
    with torch.no_grad():
        alone = wrapped(input_ids=batch["input_ids"][1:, :real]).logits[0]
        padded = wrapped(**batch).logits[1, :real]
        unmasked = wrapped(input_ids=batch["input_ids"]).logits[1, :real]  # causal: only β moves
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, rtol=1e-5, atol=1e-5)


def test_generate_with_left_padding() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=4), cfg())
    randomize(wrapped, gates=True)
    ids = torch.randint(0, VOCAB - 2, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    out = wrapped.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 10)
    assert torch.equal(out[:, :6], ids)


def test_cached_generation_keeps_the_prompts_gate() -> None:
    """Greedy decoding with the KV cache equals decoding by full forwards in which the generated
    tokens are answer tokens (labels): β stays the prompt's while the answer is generated."""
    wrapped = inject_pqlora(tiny_llama(layers=4), cfg(gate_noise=False))
    randomize(wrapped, gates=True)
    ids = torch.randint(0, VOCAB - 2, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        cached = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        full_ids, full_mask = ids, mask
        for _ in range(5):
            labels = torch.full_like(full_ids, -100)
            labels[:, 6:] = full_ids[:, 6:]
            logits = wrapped(input_ids=full_ids, attention_mask=full_mask, labels=labels).logits
            full_ids = torch.cat([full_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert torch.equal(cached, full_ids)
    with torch.no_grad(), pytest.raises(ValueError, match="without a prompt forward of the same batch"):
        # one new token for 1 sample, after a prompt forward of 2: there is no β to keep
        wrapped(input_ids=ids[:1, -1:], attention_mask=torch.ones(1, 7, dtype=torch.long))


# -- training ---------------------------------------------------------------------------------
def test_only_local_branch_and_gate_receive_gradients() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg(dropout=0.1))
    wrapped.load_global_state(
        shared=randn_like_state(wrapped.shared_state("global"), 4),
        same_arch=randn_like_state(wrapped.same_arch_state("global"), 5),
    )  # G ≠ L, so the gate has a non-zero gradient
    wrapped.train()
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(torch.arange(9) < 4, -100)  # a 4-token prompt
    wrapped(**batch, labels=labels).loss.backward()
    groups = wrapped.parameter_groups()
    trainable = {id(p) for ps in groups.values() for p in ps}
    for name, p in wrapped.named_parameters():
        if id(p) in trainable:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, name
    frozen_names = [n for n, p in wrapped.named_parameters() if id(p) not in trainable]
    assert any(".global" in n for n in frozen_names) and any("pq_A" in n for n in frozen_names)
    assert any("base_layer.weight" in n for n in frozen_names) and any("embed" in n for n in frozen_names)
    for p in groups["pq"] + groups["gate"]:
        assert p.grad.abs().sum() > 0
    lora_b = [p for n, p in wrapped.named_parameters() if n.endswith("lora_B.local")]
    assert lora_b and all(p.grad.abs().sum() > 0 for p in lora_b)


def test_parameter_groups_partition_the_trainable_parameters() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg())
    groups = wrapped.parameter_groups()
    assert set(groups) == {"pq", "gate", "lora", "pq-global", "lora-global"}
    assert groups["pq-global"] == groups["lora-global"] == []  # frozen unless a method trains it
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in wrapped.parameters() if p.requires_grad}
    n_adapted = 5 * 7
    assert len(groups["gate"]) == n_adapted
    assert len(groups["pq"]) == 4 * 7 * 2 and len(groups["lora"]) == 1 * 7 * 2


# -- state views across architectures -----------------------------------------------------------
def test_shared_state_is_architecture_independent() -> None:
    small = inject_pqlora(tiny_llava(LlamaConfig, hidden=32, layers=4), cfg())
    large = inject_pqlora(tiny_llava(Qwen2Config, hidden=48, layers=8), cfg())
    plain = inject_pqlora(Qwen2ForCausalLM(text_config(Qwen2Config, 64, 6)), cfg())
    shapes = [{k: tuple(v.shape) for k, v in m.shared_state().items()} for m in (small, large, plain)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert len(shapes[0]) == 4 * 7 * 2
    assert small.same_arch_state() == {}  # 4 layers: all are PQ layers
    assert set(large.same_arch_state()) != set(plain.same_arch_state())
    assert small.pq_bases()["pq.0.q_proj.A"].shape == (4, 32)
    assert large.pq_bases()["pq.0.q_proj.A"].shape == (4, 48)
    large.load_global_state(shared=small.shared_state())  # cross-architecture exchange
    # LLaVA: only the language model is adapted
    for item in large.adapted_modules:
        assert item.path.startswith("model.language_model.layers.")
    for name, module in large.named_modules():
        if "vision_tower" in name or "multi_modal_projector" in name or "lm_head" in name:
            assert not isinstance(module, (PQLoRALinear, DualLoRALinear)), name
    assert not any(p.requires_grad for n, p in large.named_parameters() if "vision_tower" in n)
    assert set(large.local_only_state()) == {
        f"gate.{layer}.{m}.weight" for layer in range(8) for m in PQLoRAConfig().target_modules
    }


def test_bases_are_seeded_and_identical_for_one_architecture() -> None:
    one = inject_pqlora(tiny_llama(layers=5), cfg(seed=3))
    two = inject_pqlora(tiny_llama(layers=5), cfg(seed=3))  # other random base weights
    other = inject_pqlora(tiny_llama(layers=5), cfg(seed=4))
    for key, value in one.pq_bases().items():
        assert torch.equal(value, two.pq_bases()[key])
        assert not torch.equal(value, other.pq_bases()[key])
    for key, value in one.same_arch_state().items():
        assert torch.equal(value, two.same_arch_state()[key]), key


# -- bad input ----------------------------------------------------------------------------------
def test_unmatched_target_module_leaves_model_unchanged() -> None:
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match="'nope' matches nothing in decoder layer 0"):
        inject_pqlora(model, cfg(target_modules=("q_proj", "nope")))
    assert not any(isinstance(m, (PQLoRALinear, DualLoRALinear)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_rank_larger_than_width_names_the_module() -> None:
    model = tiny_llama(hidden=32, layers=4)
    with pytest.raises(ValueError, match=r"r=40 .* module 'q_proj' of decoder layer 0"):
        inject_pqlora(model, cfg(r=40))
    assert not any(isinstance(m, PQLoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match="fewer|smaller than num_blocks"):
        inject_pqlora(tiny_llama(layers=3), cfg())


def _bad_shared(kind: str, good: dict[str, torch.Tensor]) -> Any:
    state = dict(good)
    if kind == "other_r":
        return inject_pqlora(tiny_llama(layers=4), cfg(r=2)).shared_state()
    if kind == "missing":
        del state["pq.2.v_proj.Q"]
    elif kind == "unknown":
        state["pq.9.v_proj.Q"] = torch.zeros(4)
    elif kind == "nan":
        state["pq.1.up_proj.P"] = state["pq.1.up_proj.P"].clone()
        state["pq.1.up_proj.P"][0, 1] = float("nan")
    elif kind == "inf":
        state["pq.1.up_proj.Q"] = torch.full((4,), float("inf"))
    elif kind == "numpy":
        state["pq.0.q_proj.P"] = np.zeros((4, 4), dtype=np.float32)
    elif kind == "int":
        state["pq.0.q_proj.P"] = torch.zeros(4, 4, dtype=torch.int64)
    elif kind == "not_a_mapping":
        return [1, 2]
    return state


@pytest.mark.parametrize(
    ("kind", "match"),
    [("other_r", r"wrong rank r=2 \(expected r=4\): .*'pq.0.q_proj.P' has shape \(2, 2\), expected \(4, 4\)"),
     ("missing", r"missing key\(s\) \[pq.2.v_proj.Q\]"),
     ("unknown", r"unknown key\(s\) \[pq.9.v_proj.Q\]"),
     ("nan", r"non-finite values \(NaN/Inf\) in .*'pq.1.up_proj.P'"),
     ("inf", r"non-finite values \(NaN/Inf\) in .*'pq.1.up_proj.Q'"),
     ("numpy", "'pq.0.q_proj.P' is not a floating-point torch.Tensor"),
     ("int", "'pq.0.q_proj.P' is not a floating-point torch.Tensor"), ("not_a_mapping", "must be a mapping")],
)
def test_bad_global_state_raises_one_error_and_changes_nothing(kind: str, match: str) -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg())
    good_shared = randn_like_state(wrapped.shared_state(), 7)
    good_lora = randn_like_state(wrapped.same_arch_state(), 8)
    before = snapshot(wrapped)
    with pytest.raises(AdapterStateError, match=match) as info:
        # the valid same-arch part must not be applied either
        wrapped.load_global_state(shared=_bad_shared(kind, good_shared), same_arch=good_lora)
    assert "nothing was changed" in str(info.value)
    assert_same_state(wrapped, before)


def test_bad_same_arch_state_blocks_valid_shared_state() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg(lora_r=2))
    before = snapshot(wrapped)
    other_rank = inject_pqlora(tiny_llama(layers=5), cfg(lora_r=3)).same_arch_state()
    with pytest.raises(AdapterStateError, match=r"wrong rank r=3 \(expected r=2\): .*'lora.3.q_proj.A' has shape \(3, 32\), expected \(2, 32\)"):
        wrapped.load_global_state(shared=randn_like_state(wrapped.shared_state(), 1), same_arch=other_rank)
    assert_same_state(wrapped, before)
    with pytest.raises(AdapterStateError, match="no state given"):
        wrapped.load_global_state()


def test_load_global_state_fills_the_global_branch_only() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg())
    shared = randn_like_state(wrapped.shared_state(), 1)
    lora = randn_like_state(wrapped.same_arch_state(), 2)
    local_before = (wrapped.shared_state(), wrapped.same_arch_state(), wrapped.local_only_state())
    wrapped.load_global_state(shared=shared, same_arch=lora)
    for key, value in shared.items():
        assert torch.equal(wrapped.shared_state("global")[key], value)
    for key, value in lora.items():
        assert torch.equal(wrapped.same_arch_state("global")[key], value)
    after = (wrapped.shared_state(), wrapped.same_arch_state(), wrapped.local_only_state())
    for old, new in zip(local_before, after, strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
    # views are copies: editing them does not touch the model
    view = wrapped.shared_state("global")
    view["pq.0.q_proj.P"].zero_()
    assert torch.equal(wrapped.shared_state("global")["pq.0.q_proj.P"], shared["pq.0.q_proj.P"])


def test_load_pq_bases_validates_then_replaces() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=4), cfg())
    bases = wrapped.pq_bases()
    new = {k: torch.flip(v, dims=[0]) for k, v in bases.items()}
    wrapped.load_pq_bases(new)
    assert torch.equal(wrapped.pq_bases()["pq.3.down_proj.B"], new["pq.3.down_proj.B"])
    new.pop("pq.3.down_proj.B")
    with pytest.raises(AdapterStateError, match="pq.3.down_proj.B"):
        wrapped.load_pq_bases(new)


# -- save / load / merge ------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path: Any) -> None:
    model = tiny_llama(layers=5)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = inject_pqlora(model, cfg(seed=11))
    randomize(wrapped, gates=True)
    folder = wrapped.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    meta = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert meta["config"]["r"] == 4 and meta["pq_layer_indices"] == [0, 1, 2, 4]

    twin = tiny_llama(layers=5)
    twin.load_state_dict(base_weights)
    restored = load_pqlora(twin, folder)
    assert restored.pqlora_config == wrapped.pqlora_config
    for view in ("shared_state", "same_arch_state"):
        for branch in ("local", "global"):
            a, b = getattr(wrapped, view)(branch), getattr(restored, view)(branch)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for a, b in ((wrapped.local_only_state(), restored.local_only_state()), (wrapped.pq_bases(), restored.pq_bases())):
        assert all(torch.equal(a[k], b[k]) for k in a)
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, restored(**batch).logits)

    mismatch = inject_pqlora(tiny_llama(layers=5), cfg(r=2))
    before = snapshot(mismatch)
    with pytest.raises(AdapterStateError, match="config.r is 4, this model has 2"):
        mismatch.load_adapter(folder)
    assert_same_state(mismatch, before)


def test_merged_equals_unmerged() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg())
    randomize(wrapped)  # gates stay 0 → β = ½ for every input
    batch = make_batch()
    with torch.no_grad():
        unmerged = wrapped(**batch).logits
        merged_model = wrapped.merge_and_unload()
        merged = merged_model(**batch).logits
    assert rel_err(merged, unmerged) <= 1e-5
    assert not any(isinstance(m, (PQLoRALinear, DualLoRALinear)) for m in merged_model.modules())
    q_pq = merged_model.model.layers[0].self_attn.q_proj
    q_lora = merged_model.model.layers[3].self_attn.q_proj
    assert type(q_pq) is nn.Linear and q_pq.bias is not None  # Q contributes a bias
    assert q_lora.bias is not None and not bool(q_lora.bias.any())  # plain LoRA adds none: a declared zero bias
    with pytest.raises(RuntimeError, match="merged"):
        wrapped(**batch)


def test_merge_with_input_dependent_gate_needs_constant_beta() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg())
    randomize(wrapped, gates=True)
    batch = make_batch()
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="input dependent"):
        wrapped.merge_and_unload()
    assert_same_state(wrapped, before)
    with torch.no_grad():
        gated = wrapped(**batch).logits
        wrapped.set_fixed_beta(0.0)  # local branch only
        local_only = wrapped(**batch).logits
        wrapped.set_fixed_beta(None)
        merged = wrapped.merge_and_unload(beta=0.0)(**batch).logits
    assert rel_err(merged, local_only) <= 1e-5
    assert rel_err(gated, local_only) > 1e-3  # the gate did matter


@pytest.mark.parametrize("gate_noise", [False, True])
def test_activation_checkpointing_recomputes_the_same_gates(gate_noise: bool) -> None:
    """The attention mask outlives the forward and the noise's RNG state is restored, so
    recomputed gates in backward match."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        wrapped = inject_pqlora(tiny_llama(layers=5), cfg(gate_noise=gate_noise))
        randomize(wrapped, gates=True)
        if checkpointing:
            wrapped.enable_activation_checkpointing()
            assert wrapped.is_activation_checkpointing
        wrapped.train()
        batch = make_batch()  # padded: masked and unmasked gates would differ
        labels = batch["input_ids"].masked_fill(torch.arange(9) < 4, -100)  # a 4-token prompt
        wrapped(**batch, labels=labels).loss.backward()
        grads.append([p.grad for ps in wrapped.parameter_groups().values() for p in ps])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


def test_llava_forward_with_image_trains_the_language_adapter() -> None:
    model = tiny_llava(Qwen2Config, hidden=32, layers=4)
    wrapped = inject_pqlora(model, cfg())
    image_tokens = 4  # 16×16 image, 8×8 patches, CLS dropped
    ids = torch.randint(0, VOCAB - 2, (2, 10))
    ids[:, 1 : 1 + image_tokens] = VOCAB - 1
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    wrapped.train()
    out = wrapped(
        input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16), labels=ids
    )
    out.loss.backward()
    assert all(p.grad is not None for p in wrapped.parameter_groups()["pq"])
    assert all(p.grad is None for n, p in wrapped.named_parameters() if "vision_tower" in n)


def test_bfloat16_base_keeps_float32_adapter() -> None:
    model = tiny_llama(layers=4).to(torch.bfloat16)
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    wrapped = inject_pqlora(model, cfg())
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, reference)
    wrapped.train()
    wrapped(**batch, labels=batch["input_ids"]).loss.backward()
    p = wrapped.parameter_groups()["pq"][0]
    assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0


def test_gates_without_global_are_those_whose_global_branch_is_zero() -> None:
    wrapped = inject_pqlora(tiny_llama(layers=8), cfg())  # 4 PQ layers, 4 plain-LoRA layers
    all_gates = wrapped.parameter_groups()["gate"]
    assert {id(g) for g in wrapped.gates_without_global()} == {id(g) for g in all_gates}
    wrapped.load_global_state(shared=randn_like_state(wrapped.shared_state("global"), 4))
    resting = {id(g) for g in wrapped.gates_without_global()}
    pq_gates = {id(i.adapter.gate.weight) for i in wrapped.adapted_modules if i.block is not None}
    assert resting == {id(g) for g in all_gates} - pq_gates and resting  # plain-LoRA globals are still 0
    wrapped.load_global_state(same_arch=randn_like_state(wrapped.same_arch_state("global"), 5))
    assert wrapped.gates_without_global() == []


def test_merged_q_biases_survive_save_and_reload(tmp_path: Any) -> None:
    """Q becomes a bias on the PQ layers' projections. A Llama config without biases would drop
    them on reload: the merge declares them (attention_bias / mlp_bias) and gives every other
    projection a zero bias, so the checkpoint loads with nothing missing or unexpected."""
    wrapped = inject_pqlora(tiny_llama(layers=5), cfg(gate_noise=False))
    wrapped.load_local_state(shared=randn_like_state(wrapped.shared_state(), seed=3))
    batch = make_batch()
    with torch.no_grad():
        wrapped.set_fixed_beta(0.0)
        unmerged = wrapped(**batch).logits
        merged = wrapped.merge_and_unload()
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path)
    reloaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = reloaded.eval()(**batch).logits
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_warns_when_the_config_cannot_describe_the_q_biases(caplog: Any) -> None:
    """Qwen2's o_proj and MLP have no bias option: a merged model is right in memory, but a
    checkpoint of it would lose those biases; the merge says so, naming them."""
    model = Qwen2ForCausalLM(text_config(Qwen2Config, 32, 4)).eval()
    wrapped = inject_pqlora(model, cfg(gate_noise=False))
    wrapped.load_local_state(shared=randn_like_state(wrapped.shared_state(), seed=3))
    with caplog.at_level("WARNING"):
        wrapped.merge_and_unload(beta=0.0)
    assert "o_proj" in caplog.text and "down_proj" in caplog.text and "reload" in caplog.text
