"""PQ-LoRA on bitsandbytes 4-bit / 8-bit bases on CPU (docs/method.md, "Offline models": evaluate, then train)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fedmosaic_core.modeling import decoder_parts
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora
from fedmosaic_core.pqlora.layer import dense_weight

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 96
TARGETS = PQLoRAConfig().target_modules


def tiny_llama(layers: int = 5) -> LlamaForCausalLM:
    cfg = LlamaConfig(  # widths ≥ the 4-bit block size (64)
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def quantise(model: nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the decoder's target linears by bitsandbytes layers, quantised by moving to CPU."""
    for layer in decoder_parts(model).layers:
        for name, module in list(layer.named_modules()):
            if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS):
                continue
            args = (module.in_features, module.out_features, module.bias is not None)
            if kind == "nf4":
                q = bnb.nn.Linear4bit(*args, quant_type="nf4", compute_dtype=compute_dtype)
            else:
                q = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
            q.load_state_dict(module.state_dict())
            q = q.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, q)
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def local_grads_reach_every_layer(wrapped: Any) -> None:
    wrapped.train()
    wrapped(**batch()).loss.backward()
    groups = wrapped.parameter_groups()
    for p in groups["pq"] + groups["gate"] + groups["lora"]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # P of the first PQ layer gets its gradient only through the 4-bit bases above it
    first_p = wrapped.adapted_modules[0].adapter.pq_P["local"]
    assert first_p.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in groups["pq"] if p.ndim == 2)


def test_4bit_base_evaluate_then_train_gradients_reach_adapter() -> None:
    model = quantise(tiny_llama(), "nf4")
    with torch.no_grad():  # may repack the weights on AVX512-BF16 CPUs before injection
        model(**batch())
    wrapped = inject_pqlora(model, PQLoRAConfig(r=4, alpha=8, dropout=0.05))
    layers4 = [m for m in wrapped.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers4) == 5 * 7
    assert all(m.support_avx512bf16_for_cpu is False for m in layers4)
    assert {i.adapter.base_kind for i in wrapped.adapted_modules} == {"4bit"}
    wrapped.load_global_state(shared={k: torch.randn_like(v) * 0.1 for k, v in wrapped.shared_state().items()})
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(**batch()).logits
    assert torch.isfinite(logits).all()
    for m in layers4:
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    local_grads_reach_every_layer(wrapped)


def test_4bit_merge_needs_dequantize_and_then_matches() -> None:
    wrapped = inject_pqlora(quantise(tiny_llama(), "nf4"), PQLoRAConfig(r=4, alpha=8, dropout=0.0))
    wrapped.load_local_state(shared={k: torch.randn_like(v) * 0.2 for k, v in wrapped.shared_state().items()})
    with pytest.raises(ValueError, match="dequantize=True"):
        wrapped.merge_and_unload()
    assert {i.adapter.base_kind for i in wrapped.adapted_modules} == {"4bit"}  # unchanged
    with torch.no_grad():
        unmerged = wrapped(**batch()).logits
        merged_model = wrapped.merge_and_unload(dequantize=True)
        merged = merged_model(**batch()).logits
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged_model.modules())
    assert float((merged - unmerged).norm() / unmerged.norm()) <= 1e-5


def test_a_bf16_nf4_model_merges_into_bf16_layers() -> None:
    """A bf16 model on 4-bit bases with bf16 compute (as transformers loads NF4 on CUDA): the merged
    dense layers take the model's dtype, so the merged model runs (float32 layers beside bf16
    activations raised a dtype error on the GPU) and matches the unmerged one to bf16 rounding."""
    model = quantise(tiny_llama().to(torch.bfloat16), "nf4", compute_dtype=torch.bfloat16)
    wrapped = inject_pqlora(model, PQLoRAConfig(r=4, alpha=8, dropout=0.0))
    wrapped.load_local_state(shared={k: torch.randn_like(v) * 0.2 for k, v in wrapped.shared_state().items()})
    wrapped.set_fixed_beta(0.0)
    with torch.no_grad():
        unmerged = wrapped(**batch()).logits.float()
        merged_model = wrapped.merge_and_unload(beta=0.0, dequantize=True)
        merged = merged_model(**batch()).logits.float()
    dense = [m for n, m in merged_model.named_modules() if isinstance(m, nn.Linear) and n.endswith("q_proj")]
    assert dense and all(m.weight.dtype == torch.bfloat16 for m in dense)
    assert float((merged - unmerged).norm() / unmerged.norm()) <= 1e-2


def test_8bit_base_forward_and_gradients() -> None:
    model = tiny_llama()
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    model = quantise(model, "int8")
    with torch.no_grad():
        before = model(**batch()).logits
    wrapped = inject_pqlora(model, PQLoRAConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        assert torch.equal(wrapped(**batch()).logits, before)  # adapter output is 0 at init
    item = wrapped.adapted_modules[0]
    assert item.adapter.base_kind == "8bit"
    dense = dense_weight(item.adapter.base_layer)
    original = reference[item.path]
    assert float((dense - original).abs().max()) <= float(original.abs().max()) / 100
    local_grads_reach_every_layer(wrapped)


def test_a_merged_nf4_checkpoint_saves_and_reloads_as_a_dense_model(tmp_path: Any) -> None:
    """merge_and_unload(dequantize=True) on a model loaded in NF4 by transformers: the merged
    model no longer carries the 4-bit quantization config, so save_pretrained / from_pretrained
    give it back dense, with the same logits."""
    from fedmosaic_core.models.loading import load_model
    from fedmosaic_core.models.tokenizer import load_tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    load_tiny_tokenizer().save_pretrained(tmp_path / "base")
    loaded = load_model(tmp_path / "base", quantization="nf4", device="cpu", cache_dir=tmp_path / "cache")
    assert getattr(loaded.model, "hf_quantizer", None) is not None
    wrapped = inject_pqlora(loaded.model, PQLoRAConfig(r=4, alpha=8, dropout=0.0))
    wrapped.load_local_state(shared={k: torch.randn_like(v) * 0.2 for k, v in wrapped.shared_state().items()
                                     if k.endswith(".P")} | {k: v for k, v in wrapped.shared_state().items()
                                                              if k.endswith(".Q")})
    with torch.no_grad():
        unmerged = wrapped(**batch()).logits
        merged_model = wrapped.merge_and_unload(dequantize=True)
    assert getattr(merged_model.config, "quantization_config", None) is None
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged_model.modules())
    merged_model.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        again = reloaded(**batch()).logits
    assert float((again - unmerged).norm() / unmerged.norm()) <= 1e-5
