"""A/B alignment (docs/method.md, "Aligning A and B across architectures"): math pieces, cross-tokenizer matching, end-to-end files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_models_standin import standin_public_samples
from transformers import PreTrainedTokenizerFast

from fedmosaic_core.models import load_model
from fedmosaic_core.models.align import (
    AlignConfig,
    AlignedBases,
    AlignmentError,
    align_bases,
    anchor_aligned_bases,
    cca_map_b,
    dtw_match,
    fit_latent_matching_a,
    load_aligned_bases,
    nearest_row_orthonormal,
    orthonormality_error,
    save_aligned_bases,
    token_positions,
)
from fedmosaic_core.models.tokenizer_build import tokenizer_config, train_tokenizer
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

R = 8
CONFIG = AlignConfig(r=R, steps=300, max_samples=80, cca_samples=60)
PQ = PQLoRAConfig(r=R, alpha=16, dropout=0.0, gate_noise=False, seed=CONFIG.seed)


@pytest.fixture(scope="module")
def samples() -> list:
    return standin_public_samples(80, seed=3)


@pytest.fixture(scope="module")
def anchor():  # type: ignore[no-untyped-def]
    return load_model("tiny-llama-s", random_init=True, seed=0)


@pytest.fixture(scope="module")
def aligned(anchor, samples) -> dict[str, AlignedBases]:  # type: ignore[no-untyped-def]
    out = {}
    for name in ("tiny-llama-m", "tiny-qwen2-s"):
        other = load_model(name, random_init=True, seed=1)
        out[name] = align_bases(anchor, other, samples, CONFIG)
    return out


# ---------------------------------------------------------------------------------- math
def test_latent_matching_recovers_a_rotation_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    d, r = 24, 6
    x_anchor = torch.randn(500, d, generator=gen, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    x_other = x_anchor @ rotation.T  # the other model sees a rotated copy of the input
    a_anchor = nearest_row_orthonormal(torch.randn(r, d, generator=gen, dtype=torch.float64))
    a_init = nearest_row_orthonormal(torch.randn(r, d, generator=gen, dtype=torch.float64))
    a_other = fit_latent_matching_a(x_other, x_anchor @ a_anchor.T, a_init, AlignConfig(r=r, steps=600))
    assert orthonormality_error(a_other) < 1e-10
    torch.testing.assert_close(a_other, a_anchor @ rotation.T, atol=1e-3, rtol=0)


def test_cca_b_is_identity_for_equal_outputs_and_scales_with_them() -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(400, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen, dtype=torch.float64)
    b_anchor = nearest_row_orthonormal(torch.randn(4, 12, generator=gen, dtype=torch.float64)).T
    same, corr = cca_map_b(y, y, b_anchor, gamma=1e-4)
    torch.testing.assert_close(same, b_anchor, atol=1e-5, rtol=0)
    assert corr == pytest.approx(1.0, abs=1e-5)
    doubled, _ = cca_map_b(y, 2 * y + 3.0, b_anchor, gamma=1e-4)  # centring removes the shift
    torch.testing.assert_close(doubled, 2 * b_anchor, atol=1e-5, rtol=0)
    wide, _ = cca_map_b(y, torch.cat([y, y[:, :3]], dim=1), b_anchor, gamma=1e-4)
    assert wide.shape == (15, 4)


def test_dtw_matches_tokens_of_different_tokenizers(anchor, samples) -> None:  # type: ignore[no-untyped-def]
    coarse = anchor.processor
    fine = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(600), **tokenizer_config())
    sample = next(s for s in samples if not s.images)
    ids_a, pos_a = token_positions(coarse.tokenizer, sample, 0)
    ids_b, pos_b = token_positions(fine, sample, 0)
    text_a = [p for p in pos_a if p.kind == "text"]
    text_b = [p for p in pos_b if p.kind == "text"]
    assert len(text_b) > len(text_a)  # a smaller vocabulary splits words further
    assert text_a[-1].end == text_b[-1].end  # both cover the same text
    path, error = dtw_match(text_a, text_b)
    assert path[0] == (0, 0) and path[-1] == (len(text_a) - 1, len(text_b) - 1)
    assert all(i2 >= i1 and j2 >= j1 for (i1, j1), (i2, j2) in zip(path, path[1:], strict=False))
    assert 0.0 < error < 0.6
    for i, j in path:  # every matched pair overlaps in the text
        assert min(text_a[i].end, text_b[j].end) > max(text_a[i].start, text_b[j].start)
    _, same_error = dtw_match(text_a, text_a)
    assert same_error == 0.0


def test_a_chat_template_model_matches_the_scaffold_model_on_the_same_text(anchor, samples) -> None:  # type: ignore[no-untyped-def]
    """A real model prompts in its own chat template (SmolLM2: ChatML). Its ids are exactly
    collate's, the template's tokens are special, and the prompt's and answer's tokens carry the
    same char spans as in the tiny presets' scaffold, so DTW pairs the same words."""
    from test_models import CHATML

    from fedmosaic_core.models import collate

    scaffold = anchor.processor.tokenizer
    templated = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(600), **tokenizer_config())
    templated.chat_template = CHATML
    sample = next(s for s in samples if not s.images)
    ids, positions = token_positions(templated, sample, 0)
    batch = collate(templated, [sample], 128)
    assert ids == batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()
    special = [templated.decode([i]) for i, p in zip(ids, positions, strict=True) if p.kind == "special"]
    assert "<|im_start|>" in "".join(special) and "<|im_end|>" in "".join(special)
    text = [p for p in positions if p.kind == "text"]
    reference = [p for p in token_positions(scaffold, sample, 0)[1] if p.kind == "text"]
    assert text[0].start >= reference[0].start and text[-1].end <= reference[-1].end
    assert all(any(min(p.end, q.end) > max(p.start, q.start) for q in reference) for p in text)  # same words
    _, error = dtw_match(reference, text)
    assert error < 0.6


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("other", ["tiny-llama-m", "tiny-qwen2-s"])
def test_alignment_improves_latent_agreement_and_keeps_a_orthonormal(aligned, other: str) -> None:  # type: ignore[no-untyped-def]
    metrics = aligned[other].metrics
    assert metrics["cosine_after"] > metrics["cosine_before"] + 0.4
    assert metrics["cka_after"] > metrics["cka_before"]
    assert metrics["max_orthonormality_error_A"] <= 1e-4
    assert metrics["token_matching_error_held_out"] == 0.0  # the presets share a tokenizer
    assert metrics["held_out_positions"] > 100
    # the same P moves both models alike after alignment (seeded B: no relation at all), and the
    # orthonormalised B transfers at least as well as the raw, ill-conditioned CCA map
    assert abs(metrics["b_transfer_seeded"]) < 0.1
    assert metrics["b_transfer_after"] > metrics["b_transfer_seeded"] + 0.15
    assert metrics["b_transfer_after"] >= metrics["b_transfer_cca_raw"] - 0.02
    for key, value in aligned[other].state.items():
        if key.endswith(".A"):
            assert value.shape[0] == R and orthonormality_error(value) <= 1e-4
        else:  # B: orthonormal columns, the anchor's conditioning
            assert value.shape[1] == R and orthonormality_error(value.T) <= 1e-4


def test_files_load_into_injected_models(anchor, aligned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    anchor_file = save_aligned_bases(anchor_aligned_bases(anchor, CONFIG), tmp_path)
    medium = aligned["tiny-llama-m"]
    medium_file = save_aligned_bases(medium, tmp_path)
    meta = json.loads(medium_file.with_suffix(".json").read_text())
    assert meta["r"] == R and meta["anchor"] == anchor.fingerprint.with_rank(R).id
    assert meta["fingerprint_id"] == medium_file.stem

    fresh_anchor = inject_pqlora(load_model("tiny-llama-s", random_init=True).model, PQ)
    default_bases = fresh_anchor.pq_bases()
    load_aligned_bases(fresh_anchor, tmp_path)  # directory: picks the file by architecture
    for key, value in fresh_anchor.pq_bases().items():  # anchor file = PQ-LoRA seeded init
        torch.testing.assert_close(value, default_bases[key])

    model = inject_pqlora(load_model("tiny-llama-m", random_init=True).model, PQ)
    before = model.pq_bases()
    load_aligned_bases(model, medium_file)
    after = model.pq_bases()
    assert set(after) == set(medium.state)
    for key, value in medium.state.items():
        torch.testing.assert_close(after[key], value)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert anchor_file.exists()


# -------------------------------------------------------------------------------- errors
def test_bad_files_and_ranks_give_clear_errors(aligned, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    medium = aligned["tiny-llama-m"]
    file = save_aligned_bases(medium, tmp_path)
    model_r4 = inject_pqlora(load_model("tiny-llama-m", random_init=True).model,
                             PQLoRAConfig(r=4, alpha=8, dropout=0.0))
    with pytest.raises(AlignmentError, match=r"aligned with r=8 but the model uses r=4"):
        load_aligned_bases(model_r4, file)

    small = inject_pqlora(load_model("tiny-llama-s", random_init=True).model, PQ)
    with pytest.raises(AlignmentError, match="belong to architecture llama-d96"):
        load_aligned_bases(small, file)
    with pytest.raises(AlignmentError, match="no A/B file for architecture qwen2"):
        load_aligned_bases(inject_pqlora(load_model("tiny-qwen2-s", random_init=True).model, PQ), tmp_path)

    # right description, wrong tensor shapes
    broken = dict(medium.state)
    broken["pq.0.q_proj.A"] = torch.zeros(R, 10)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    (tmp_path / "broken.json").write_text(file.with_suffix(".json").read_text())
    target = inject_pqlora(load_model("tiny-llama-m", random_init=True).model, PQ)
    untouched = target.pq_bases()
    with pytest.raises(AlignmentError, match=r"pq.0.q_proj.A has shape \(8, 10\), the model needs \(8, 96\)"):
        load_aligned_bases(target, tmp_path / "broken.safetensors")
    assert all(torch.equal(v, target.pq_bases()[k]) for k, v in untouched.items())

    (tmp_path / "nometa.safetensors").write_bytes(file.read_bytes())
    with pytest.raises(AlignmentError, match="nometa.json is missing"):
        load_aligned_bases(target, tmp_path / "nometa.safetensors")


def test_rank_larger_than_a_module_is_rejected(anchor, samples) -> None:  # type: ignore[no-untyped-def]
    other = load_model("tiny-qwen2-s", random_init=True)
    with pytest.raises(AlignmentError, match=r"tiny-llama-s: r=40 is too large .*'k_proj'.*d_out=32"):
        align_bases(anchor, other, samples[:8], AlignConfig(r=40, steps=1))
    with pytest.raises(AlignmentError, match="held_out_fraction"):
        AlignConfig(held_out_fraction=1.5)
    with pytest.raises(AlignmentError, match="b_normalisation must be one of"):
        AlignConfig(b_normalisation="unit")
