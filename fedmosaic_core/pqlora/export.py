"""A merged PQ-LoRA update as a standard peft LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) that any peft or multi-LoRA server loads on the base model.

At a constant β per module every adapted linear's update is low rank plus a bias
(:meth:`PQLoRAModel.low_rank_updates`): ``x ↦ x·(up·down)ᵀ + bias``. In peft's LoRA,
``lora_B(lora_A(x))·scaling`` with ``lora_bias=True`` (lora_B has a bias), so

    lora_A.weight = down,  lora_B.weight = up,  lora_B.bias = bias,  scaling = 1

(``lora_alpha`` equals the module's rank). PQ layers give rank r and a bias (Q); plain dual-LoRA
layers rank 2·lora_r (both branches stacked) or lora_r (global branch off or zero) and no bias.
Modules whose rank differs from the most common one are listed in ``rank_pattern`` /
``alpha_pattern``.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedmosaic_core.modeling import decoder_parts
from fedmosaic_core.storage import atomic_build_dir

from .layer import LowRankUpdate
from .model import BIAS_SWITCHES, give_zero_biases, undescribed_biases

#: fields a Qwen2 text config shares with a Llama one (the decoder layers are the same modules)
_QWEN2_AS_LLAMA = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                   "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout",
                   "pad_token_id", "bos_token_id", "eos_token_id")


class NotDescribableError(ValueError):
    """A merged model whose biases no checkpoint config of its family can describe."""


def dense_checkpoint_config(merged: nn.Module) -> Any:
    """The config to save a merged model under: ``None`` when its own config describes every
    bias the merge added (Llama-style switches, :func:`.model._declare_merged_biases`).

    Qwen2 has no switch for biases on o_proj and the MLP, where Q adds them. A Qwen2 decoder
    without sliding-window layers is a Llama decoder with ``attention_bias`` (q/k/v/o) and, if
    needed, ``mlp_bias``; the merged model is then given zero biases where Llama has them and
    Qwen2 did not, and the equivalent Llama text config is returned (the whole config for a
    causal LM, a copy of the multimodal config with it as ``text_config`` otherwise). Anything
    else raises :class:`NotDescribableError` naming the biases a reload would drop."""
    lost = undescribed_biases(merged)
    if not lost:
        return None
    config: Any = merged.config
    text = config.get_text_config()
    sliding = [t for t in (getattr(text, "layer_types", None) or []) if t != "full_attention"]
    if text.model_type != "qwen2" or sliding or getattr(text, "use_sliding_window", False):
        projections = ", ".join(sorted({name.split(".", 1)[1] for name in lost}))
        raise NotDescribableError(
            f"the merged biases of {len(lost)} projection(s) ({projections}) are not described by a "
            f"{text.model_type} config: a merged checkpoint would lose them, so it cannot be exported; serve "
            "the client with its unmerged PQ-LoRA adapter"
        )
    from transformers import LlamaConfig

    layers = decoder_parts(merged).layers
    mlp_bias = give_zero_biases(layers, BIAS_SWITCHES["mlp_bias"])
    give_zero_biases(layers, BIAS_SWITCHES["attention_bias"])
    llama = LlamaConfig(**{k: getattr(text, k) for k in _QWEN2_AS_LLAMA}, head_dim=getattr(text, "head_dim", None)
                        or text.hidden_size // text.num_attention_heads, attention_bias=True, mlp_bias=mlp_bias)
    left = undescribed_biases(merged, llama)
    if left:
        raise NotDescribableError(f"biases {', '.join(left[:3])} are not described even as a Llama decoder")
    if text is config:
        llama.architectures = [type(merged).__name__.replace("Qwen2", "Llama")]
        return llama
    whole = copy.deepcopy(config)
    whole.text_config = llama
    return whole


def peft_lora_config(updates: Mapping[str, LowRankUpdate], base_model_name_or_path: str) -> LoraConfig:
    """The ``peft.LoraConfig`` that holds ``updates`` (module path → update) at scaling 1."""
    if not updates:
        raise ValueError("no adapted module to export")
    ranks = {path: update.rank for path, update in updates.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(updates),
        lora_dropout=0.0,
        lora_bias=any(update.bias is not None for update in updates.values()),
        init_lora_weights=False,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )


def write_peft_adapter(
    host: nn.Module, updates: Mapping[str, LowRankUpdate], folder: Path, base_model_name_or_path: str
) -> Path:
    """Write ``updates`` as a peft LoRA adapter folder (built whole, then renamed into place).

    ``host`` is any model with plain linears at the updates' paths (the base, or the merged
    model): peft wraps it to lay out and save the adapter, and is removed again before this
    returns, leaving ``host`` as it was."""
    config = peft_lora_config(updates, base_model_name_or_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        # peft names the host's own path as the base; the adapter belongs to the unmerged base
        warnings.filterwarnings("ignore", message=r".*base_model_name_or_path. was renamed")
        wrapped = get_peft_model(host, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    try:
        inner: Any = wrapped.base_model.model
        with torch.no_grad():
            for path, update in updates.items():
                layer: Any = inner.get_submodule(path)
                lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
                if tuple(lora_a.weight.shape) != tuple(update.down.shape):
                    raise RuntimeError(f"peft laid out {path} with rank {lora_a.weight.shape[0]}, "
                                       f"the update has rank {update.rank}")
                lora_a.weight.copy_(update.down)
                lora_b.weight.copy_(update.up)
                if lora_b.bias is not None:
                    lora_b.bias.copy_(update.bias if update.bias is not None else torch.zeros_like(lora_b.bias))
        with warnings.catch_warnings():
            # peft takes a 1-D lora_B.bias for a shard that ZeRO-3/FSDP did not gather; it is whole
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            # looked up to see whether embeddings were resized; none are adapted here
            warnings.filterwarnings("ignore", message=r"Could not find a config file in")
            atomic_build_dir(Path(folder), lambda tmp: wrapped.save_pretrained(str(tmp)))
    finally:
        wrapped.unload()  # the host's own linears back in place, without the LoRA layers
    return Path(folder)
