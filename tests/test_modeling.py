from __future__ import annotations

import pytest
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
)

from fedmosaic_core.modeling import decoder_parts


def _text(cls, layers: int = 4):  # type: ignore[no-untyped-def]
    return cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )


def test_decoder_parts_causal_lm() -> None:
    parts = decoder_parts(LlamaForCausalLM(_text(LlamaConfig, 3)))
    assert len(parts.layers) == 3
    assert parts.layers_prefix == "model.layers"
    assert parts.config.hidden_size == 32


def test_decoder_parts_llava_uses_language_model_only() -> None:
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        text_config=_text(Qwen2Config, 5),
        image_token_id=63,
    )
    parts = decoder_parts(LlavaForConditionalGeneration(cfg))
    assert len(parts.layers) == 5
    assert parts.layers_prefix == "model.language_model.layers"


def test_decoder_parts_rejects_non_decoder() -> None:
    with pytest.raises(TypeError, match="Linear"):
        decoder_parts(nn.Linear(2, 2))
