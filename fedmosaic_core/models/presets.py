"""Tiny LLaVA-style presets built from configs (the embedded default models, docs/method.md, "Offline models").

Each preset is a ``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower on 32×32 images
(patch 8 → 16 patch tokens; the CLS token is dropped by the ``default`` feature strategy), a
2-layer GELU projector and a small Llama- or Qwen2-style language model, all sharing the committed
byte-level BPE tokenizer. Every language model has ≥ 4 layers so the 4-block PQ rule applies.

| preset        | LM    | hidden | layers | intermediate | heads / kv | params |
|---------------|-------|--------|--------|--------------|------------|--------|
| tiny-llama-s  | llama | 64     | 4      | 176          | 4 / 2      | ~0.63 M |
| tiny-llama-m  | llama | 96     | 8      | 256          | 6 / 2      | ~1.44 M |
| tiny-qwen2-s  | qwen2 | 64     | 4      | 176          | 4 / 2      | ~0.63 M |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .tokenizer import IMAGE_TOKEN_NAME, load_tiny_tokenizer

IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


@dataclass(frozen=True)
class PresetSpec:
    """Language-model shape of one tiny preset (the vision tower is shared by all)."""

    family: str  # "llama" | "qwen2"
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"unknown family {self.family!r}; expected 'llama' or 'qwen2'")
        if self.num_layers < 4:
            raise ValueError(f"num_layers must be >= 4 for the 4-block PQ rule, got {self.num_layers}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} / heads {self.num_heads} / kv {self.num_kv_heads}"
                " do not divide evenly"
            )


PRESETS: dict[str, PresetSpec] = {
    "tiny-llama-s": PresetSpec("llama", 64, 4, 176, 4, 2),
    "tiny-llama-m": PresetSpec("llama", 96, 8, 256, 6, 2),
    "tiny-qwen2-s": PresetSpec("qwen2", 64, 4, 176, 4, 2),
}


class UnknownPresetError(KeyError):
    """A preset name that is not in ``PRESETS``."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def preset_spec(name: str) -> PresetSpec:
    """Look up a preset or raise ``UnknownPresetError`` listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def preset_config(name: str, tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaConfig:
    """The full ``LlavaConfig`` of a preset."""
    spec = preset_spec(name)
    tokenizer = tokenizer or load_tiny_tokenizer()
    text_cls = LlamaConfig if spec.family == "llama" else Qwen2Config
    text_config = text_cls(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=48,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_NAME)),  # type: ignore[arg-type]
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """``LlavaProcessor`` = PIL CLIP image processor (32×32, no torchvision) + the tiny tokenizer."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or load_tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def build_preset(name: str, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised preset (random weights from ``seed``) and its processor."""
    tokenizer = load_tiny_tokenizer()
    config = preset_config(name, tokenizer)
    fork_devices: list[int] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), build_tiny_processor(tokenizer)
