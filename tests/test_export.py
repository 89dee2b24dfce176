"""Personal models users can serve: constant-β updates, the merge at one β per module, the peft
LoRA adapter that reproduces it, and the merged checkpoint's reload (fp32 and NF4 bases, Llama
and Qwen2 decoders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from test_pqlora import make_batch, randomize, tiny_llama, tiny_llava
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, Qwen2Config

from fedmosaic_core.pqlora import PQLoRAConfig, PQLoRAModel, inject_pqlora
from fedmosaic_core.pqlora.export import (
    NotDescribableError,
    dense_checkpoint_config,
    write_peft_adapter,
)


def _wrapped(model: Any, lora_r: int | None = 3) -> PQLoRAModel:
    wrapped = inject_pqlora(model, PQLoRAConfig(r=4, alpha=8.0, dropout=0.0, lora_r=lora_r))
    randomize(wrapped, gates=True)
    return wrapped.eval()


def _betas(wrapped: PQLoRAModel, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    return {item.path: float(torch.rand((), generator=g)) for item in wrapped.adapted_modules}


def _fix_each_gate(wrapped: PQLoRAModel, betas: dict[str, float]) -> None:
    """Make every module's gate output its own constant β (the unmerged reference)."""
    for item in wrapped.adapted_modules:
        beta = betas[item.path]
        item.adapter.gate_beta = lambda x3, ndim=3, b=beta: torch.full((x3.shape[0],), b)  # type: ignore[method-assign]


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_low_rank_update_is_the_layers_update_at_a_constant_beta() -> None:
    wrapped = _wrapped(tiny_llama())
    kinds = set()
    for item in wrapped.adapted_modules:
        layer = item.adapter
        x = torch.randn(3, 5, layer.in_features)
        for beta in (0.0, 0.3, 1.0):
            wrapped.set_fixed_beta(beta)
            with torch.no_grad():
                expected = layer(x) - layer.base_layer(x)
            update = layer.low_rank_update(beta)
            got = x @ update.down.T @ update.up.T + (update.bias if update.bias is not None else 0.0)
            assert torch.allclose(got, expected, atol=1e-5), (item.path, beta)
            kinds.add((type(layer).__name__, update.rank, update.bias is not None))
    # PQ layers: rank r with Q's bias; plain LoRA: both branches (2·lora_r), or lora_r when β = 0
    assert kinds == {("PQLoRALinear", 4, True), ("DualLoRALinear", 6, False), ("DualLoRALinear", 3, False)}


def test_mean_betas_are_the_gates_mean_over_prompt_tokens_per_sample() -> None:
    wrapped = _wrapped(tiny_llama())
    batch = make_batch(batch=3, tokens=7, pad=2)
    seen: dict[str, torch.Tensor] = {}
    hooks = [item.adapter.register_forward_hook(lambda m, a, o, p=item.path: seen.__setitem__(p, a[0].detach()))
             for item in wrapped.adapted_modules]
    betas = wrapped.mean_betas(lambda: _logits(wrapped, batch))
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].float()
    for item in wrapped.adapted_modules:
        pooled = (seen[item.path] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = torch.sigmoid(pooled @ item.adapter.gate.weight.detach().T).mean()
        assert betas[item.path] == pytest.approx(float(expected), abs=1e-6)
    assert len(set(round(b, 6) for b in betas.values())) > 1  # one β per module, not one for all
    wrapped.set_fixed_beta(0.25)
    assert set(wrapped.mean_betas(lambda: _logits(wrapped, batch)).values()) == {0.25}
    with pytest.raises(ValueError, match="saw no sample"):
        wrapped.mean_betas(lambda: None)


def test_merge_takes_one_beta_per_module() -> None:
    wrapped = _wrapped(tiny_llama())
    batch = make_batch()
    betas = _betas(wrapped)
    _fix_each_gate(wrapped, betas)
    unmerged = _logits(wrapped, batch)
    with pytest.raises(ValueError, match="1 adapted module\\(s\\) missing"):
        wrapped.merge_and_unload(dict(list(betas.items())[1:]))
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\], got 1.5 for"):
        wrapped.merge_and_unload({**betas, next(iter(betas)): 1.5})
    merged = wrapped.merge_and_unload(betas)
    assert float((_logits(merged, batch) - unmerged).abs().max()) <= 1e-5


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_export_roundtrip_checkpoint_and_peft_adapter(tmp_path: Path, quantization: str) -> None:
    """Merged at one β per module, from an fp32 or an NF4 base: the checkpoint reloads with nothing
    missing or unexpected (Q's biases kept) and the peft adapter on a fresh base gives the same logits."""
    from fedmosaic_core.models.loading import load_model
    from fedmosaic_core.models.tokenizer import load_tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    load_tiny_tokenizer().save_pretrained(tmp_path / "base")

    def base() -> Any:
        return load_model(tmp_path / "base", quantization=quantization, device="cpu", cache_dir=tmp_path / "cache").model

    wrapped = _wrapped(base())
    batch = make_batch()
    betas = wrapped.mean_betas(lambda: _logits(wrapped, batch))
    updates = wrapped.low_rank_updates(betas)
    merged = wrapped.merge_and_unload(betas, dequantize=True)
    expected = _logits(merged, batch)
    assert dense_checkpoint_config(merged) is None  # Llama's switches describe Q's biases
    merged.save_pretrained(tmp_path / "merged")
    write_peft_adapter(merged, updates, tmp_path / "adapter", str(tmp_path / "base"))
    assert float((_logits(merged, batch) - expected).abs().max()) == 0.0  # the host is left as it was

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    pq_q = reloaded.model.layers[wrapped.pq_layer_indices[0]].self_attn.q_proj
    assert pq_q.bias is not None and bool(pq_q.bias.ne(0).any())  # Q survived the reload
    assert float((_logits(reloaded.eval(), batch) - expected).abs().max()) <= 1e-4
    with_adapter = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    assert float((_logits(with_adapter, batch) - expected).abs().max()) <= 1e-4
    config = with_adapter.peft_config["default"]
    assert config.lora_bias and config.r == 4 and set(config.rank_pattern.values()) == {6}


def test_a_qwen2_decoder_is_exported_as_the_equivalent_llama_decoder(tmp_path: Path) -> None:
    """Qwen2 has no config switch for biases on o_proj and the MLP, where Q puts them: the merged
    checkpoint is written with a Llama text config (attention and MLP biases on) and reloads whole."""
    wrapped = _wrapped(tiny_llava(Qwen2Config, 32, 5))
    batch = make_batch()
    betas = _betas(wrapped, seed=1)
    merged = wrapped.merge_and_unload(betas)
    expected = _logits(merged, batch)
    config = dense_checkpoint_config(merged)
    assert config.text_config.model_type == "llama" and config.text_config.mlp_bias
    merged.config, own = config, merged.config
    merged.save_pretrained(tmp_path / "merged")
    merged.config = own
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded.model.language_model).__name__ == "LlamaModel"
    assert float((_logits(reloaded.eval(), batch) - expected).abs().max()) <= 1e-4

    sliding = _wrapped(tiny_llava(Qwen2Config, 32, 5)).merge_and_unload(betas)
    sliding.config.text_config.use_sliding_window = True
    with pytest.raises(NotDescribableError, match="o_proj.*cannot be exported"):
        dense_checkpoint_config(sliding)

