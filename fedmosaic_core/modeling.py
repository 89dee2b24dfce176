"""Locate the parts of a Hugging Face decoder that FedMosaic touches.

Works for causal LMs (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, Mistral-like) and for
vision-language models whose ``get_decoder()`` returns the language model (LLaVA, LLaVA-OneVision,
Qwen2-VL / 2.5-VL, SmolVLM / Idefics3, Gemma 3, InternVL), where only the language model is
considered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

IGNORE_INDEX = -100  # labels off the answer tokens (Hugging Face's convention)


@dataclass(frozen=True)
class DecoderParts:
    """The language model's decoder layers, final norm, output head and text config."""

    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    config: Any
    layers_prefix: str  # qualified name of ``layers`` inside the top-level model


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`; expected a Hugging Face model")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else getattr(config, "text_config", config)


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Return the decoder parts of ``model`` or raise ``TypeError`` naming what is missing."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or not hasattr(decoder, "layers"):
        raise TypeError(
            f"{type(model).__name__}: cannot find the language model's decoder layers "
            "(expected a causal LM or a vision-language model whose get_decoder() returns a decoder "
            "with `layers`, e.g. Llama, Qwen2, Gemma, LLaVA, Qwen2-VL)"
        )
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None:
        get_out = getattr(model, "get_output_embeddings", None)
        lm_head = get_out() if callable(get_out) else None
    if lm_head is None:
        raise TypeError(f"{type(model).__name__}: no lm_head / output embeddings found")
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise TypeError(f"{type(model).__name__}: the decoder has no final `norm`")
    prefix = next(
        (name for name, module in model.named_modules() if module is decoder.layers), None
    )
    if prefix is None:
        raise TypeError(f"{type(model).__name__}: decoder layers are not a submodule of the model")
    return DecoderParts(decoder.layers, norm, lm_head, _text_config(model), prefix)
