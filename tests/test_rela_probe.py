"""Closed-form task-vector gradient == autograd (Llama, Qwen2, LLaVA-style, 4-bit)."""

from __future__ import annotations

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

from fedmosaic_core.rela import TaskVectorProbe

VOCAB = 97


def _text_config(cls, hidden: int = 32, ff: int = 80):  # type: ignore[no-untyped-def]
    return cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    )


def _spread_parameters(model: nn.Module) -> nn.Module:
    """Larger random weights than HF's init, so the softmax and RMSNorm are far from trivial."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
        elif p.dim() > 1:
            p.data.normal_(0.0, 0.3)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB - 1, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    attention = torch.ones_like(ids)
    attention[1, 11:] = 0  # right padding on sample 1
    labels[1, 11:] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _autograd_down_proj_grad(model: nn.Module, down: nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    assert down.weight.grad is not None
    return down.weight.grad.detach().clone()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("model_cls", "config_cls"), [(LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)]
)
def test_closed_form_matches_autograd(model_cls, config_cls) -> None:  # type: ignore[no-untyped-def]
    model = _spread_parameters(model_cls(_text_config(config_cls))).float()
    batch = _batch()
    exact = TaskVectorProbe(model).gradient(batch)
    diagonal = TaskVectorProbe(model, exact_rmsnorm=False).gradient(batch)
    reference = _autograd_down_proj_grad(model, model.model.layers[-1].mlp.down_proj, batch)
    assert exact.shape == (32, 80) and exact.dtype == torch.float32
    assert _rel_err(exact, reference) <= 1e-4
    # the reference's diagonal RMSNorm Jacobian runs, is finite, and is measurably different
    assert torch.isfinite(diagonal).all()
    assert _rel_err(diagonal, reference) > 1e-2


def test_probe_runs_without_a_backward_graph() -> None:
    model = _spread_parameters(LlamaForCausalLM(_text_config(LlamaConfig)))
    gradient = TaskVectorProbe(model).gradient(_batch())
    assert not gradient.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_closed_form_matches_autograd_on_llava() -> None:
    image_token = VOCAB - 1
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        text_config=_text_config(Qwen2Config),
        image_token_id=image_token,
    )
    model = _spread_parameters(LlavaForConditionalGeneration(config)).float()
    batch = _batch()
    batch["input_ids"][:, 1:5] = image_token  # 2×2 patches, the CLS feature dropped
    batch["labels"][:, 1:5] = -100
    batch["pixel_values"] = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    down = model.model.language_model.layers[-1].mlp.down_proj
    exact = TaskVectorProbe(model).gradient(batch)
    assert _rel_err(exact, _autograd_down_proj_grad(model, down, batch)) <= 1e-4


def test_four_bit_probe_matches_autograd_through_its_own_forward(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    LlamaForCausalLM(_text_config(LlamaConfig, 64, 128)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        dtype=torch.float32,
    )
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    down = model.model.layers[-1].mlp.down_proj
    assert isinstance(down, bnb.nn.Linear4bit)
    batch = _batch()
    closed = TaskVectorProbe(model).gradient(batch)

    # Reference: autograd w.r.t. the down_proj output, then ∂L/∂W = Σ_t ∂L/∂out_t ⊗ u_t.
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        captured["u"] = args[0].detach()
        captured["out"] = out.detach().requires_grad_()
        return captured["out"]

    handle = down.register_forward_hook(hook)
    try:
        model(**batch).loss.backward()
    finally:
        handle.remove()
    g_out = captured["out"].grad
    assert g_out is not None
    reference = g_out.reshape(-1, 64).T @ captured["u"].reshape(-1, 128)
    assert closed.shape == (64, 128)
    assert _rel_err(closed, reference) <= 1e-4


def test_probe_rejects_batches_without_answer_tokens() -> None:
    probe = TaskVectorProbe(LlamaForCausalLM(_text_config(LlamaConfig)))
    batch = _batch()
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no answer tokens"):
        probe.gradient(batch)
    batch.pop("labels")
    with pytest.raises(ValueError, match="no `labels`"):
        probe.gradient(batch)


def test_probe_rejects_non_decoder_models() -> None:
    with pytest.raises(TypeError):
        TaskVectorProbe(nn.Linear(2, 2))
