"""PQ-LoRA in the language model of today's VLM families, each built tiny and random from its
real transformers config class: forward + backward with an image, save/reload, the same shared
keys as a LLaVA model, and one clear error for a model that cannot be adapted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as hf
from torch import nn

from fedmosaic_core.models.fingerprint import ArchitectureFingerprint
from fedmosaic_core.models.presets import build_preset
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora
from fedmosaic_core.pqlora.layer import _GatedDualAdapter

VOCAB = 160
IMAGE = VOCAB - 1  # the image token of every family here
R = 4


def _text(**extra: Any) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                num_attention_heads=4, num_key_value_heads=2, **extra)


def _vision(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **extra)


_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}
_QWEN_VISION = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
_QWEN_IMAGE = {"pixel_values": (16, 3 * 2 * 4 * 4), "image_grid_thw": [[1, 4, 4]]}  # 4×4 patches → 4 tokens

#: family → (model built from its config class, image inputs: shapes of random tensors or values)
FAMILIES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "qwen2-vl": lambda: (hf.Qwen2VLForConditionalGeneration(hf.Qwen2VLConfig(
        text_config=_text(rope_parameters=_MROPE), image_token_id=IMAGE, video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, **_QWEN_VISION))), _QWEN_IMAGE),
    "qwen2.5-vl": lambda: (hf.Qwen2_5_VLForConditionalGeneration(hf.Qwen2_5_VLConfig(
        text_config=_text(rope_parameters=_MROPE), image_token_id=IMAGE, video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           window_size=8, fullatt_block_indexes=[0], **_QWEN_VISION))), _QWEN_IMAGE),
    "smolvlm": lambda: (hf.SmolVLMForConditionalGeneration(hf.SmolVLMConfig(
        text_config=_text(), vision_config=_vision(image_size=16, patch_size=4), scale_factor=2,
        image_token_id=IMAGE)), {"pixel_values": (1, 1, 3, 16, 16)}),
    "idefics3": lambda: (hf.Idefics3ForConditionalGeneration(hf.Idefics3Config(
        text_config=_text(), vision_config=_vision(image_size=16, patch_size=4), scale_factor=2,
        image_token_id=IMAGE)), {"pixel_values": (1, 1, 3, 16, 16)}),
    "gemma3": lambda: (hf.Gemma3ForConditionalGeneration(hf.Gemma3Config(
        text_config=_text(head_dim=8, sliding_window=8), vision_config=_vision(image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)),
        {"pixel_values": (1, 3, 16, 16)}),
    "llava-onevision": lambda: (hf.LlavaOnevisionForConditionalGeneration(hf.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text()),
        vision_config=dict(model_type="siglip_vision_model", **_vision(image_size=16, patch_size=4)),
        image_token_index=IMAGE, video_token_index=VOCAB - 2, vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16]], vision_aspect_ratio="anyres_max_1")),
        {"pixel_values": (1, 2, 3, 16, 16), "image_sizes": [[16, 16]]}),
    "internvl": lambda: (hf.InternVLForConditionalGeneration(hf.InternVLConfig(
        text_config=dict(model_type="qwen2", **_text()), downsample_ratio=0.5, image_token_id=IMAGE,
        vision_config=_vision(image_size=[16, 16], patch_size=[4, 4]))), {"pixel_values": (1, 3, 16, 16)}),
}


def _build(family: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model, spec = FAMILIES[family]()
    g = torch.Generator().manual_seed(seed)
    inputs = {k: torch.randn(*v, generator=g) if k == "pixel_values" else torch.tensor(v) for k, v in spec.items()}
    return model.eval(), inputs


def _feature_rows(output: Any) -> int:
    """How many image tokens the model's image features fill (whatever form they come in)."""
    if isinstance(output, torch.Tensor):
        return int(output.reshape(-1, output.shape[-1]).shape[0])
    if isinstance(output, (list, tuple)):
        return sum(_feature_rows(o) for o in output)
    pooled = getattr(output, "pooler_output", None)
    return _feature_rows(pooled if pooled is not None else output.last_hidden_state)


def _batch(model: nn.Module, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prompt with the family's image tokens, then a 4-token answer that is the label."""
    with torch.no_grad():
        count = _feature_rows(model.get_image_features(**images))  # type: ignore[operator]
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * count + [4, 5, 6, 7]])
    labels = ids.clone()
    labels[:, : 3 + count] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **images}
    if "image_grid_thw" in images:  # Qwen2-VL's multimodal RoPE needs the image positions
        batch["mm_token_type_ids"] = (ids == IMAGE).long()
    return batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pqlora_trains_the_language_model_of_each_vlm_family(family: str, tmp_path: Path) -> None:
    model, images = _build(family)
    batch = _batch(model, images)
    wrapped = inject_pqlora(model, PQLoRAConfig(r=R, alpha=8.0, dropout=0.0))
    assert wrapped.num_layers == 8 and len(wrapped.adapted_modules) == 8 * 7
    decoder_layers = {id(m) for layer in model.get_decoder().layers for m in layer.modules()}  # type: ignore[operator]
    adapters = [m for m in model.modules() if isinstance(m, _GatedDualAdapter)]
    assert adapters and all(id(m) in decoder_layers for m in adapters)  # the vision tower is untouched
    ArchitectureFingerprint.of(model, r=R)  # what a client declares at the handshake

    wrapped.train()
    loss = wrapped(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.ne(0).any())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".local" in n or "gate" in n for n in trainable)
    assert any("pq_P.local" in n for n in with_grad) and any("lora_B.local" in n for n in with_grad)

    # save / reload onto a fresh model of the same family: the same outputs
    with torch.no_grad():
        for p in wrapped.branch_parameters("local").values():
            p.add_(torch.randn_like(p) * 0.1)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(**batch).logits
    wrapped.save_adapter(tmp_path / "adapter")
    fresh = inject_pqlora(_build(family)[0], PQLoRAConfig(r=R, alpha=8.0, dropout=0.0)).eval()
    fresh.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)

    # the state every architecture shares is the LLaVA preset's, key for key and shape for shape
    llava = inject_pqlora(build_preset("tiny-llama-m")[0], PQLoRAConfig(r=R, alpha=8.0, dropout=0.0))
    shapes = {k: tuple(v.shape) for k, v in wrapped.shared_state().items()}
    assert shapes == {k: tuple(v.shape) for k, v in llava.shared_state().items()}


@pytest.mark.parametrize(("model", "message"), [
    (lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**_vision(image_size=16, patch_size=4))),
     "CLIPVisionModel: cannot find the language model's decoder layers"),
    (lambda: hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4)),
     "GPT2LMHeadModel: cannot find the language model's decoder layers"),
])
def test_a_model_that_cannot_be_adapted_gets_one_clear_error(model: Callable[[], nn.Module], message: str) -> None:
    built = model()
    before = {n: p.clone() for n, p in built.named_parameters()}
    with pytest.raises((TypeError, ValueError), match=message):
        inject_pqlora(built, PQLoRAConfig(r=R, alpha=8.0))
    assert not any(isinstance(m, _GatedDualAdapter) for m in built.modules())
    assert all(torch.equal(p, before[n]) for n, p in built.named_parameters())
