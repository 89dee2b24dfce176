"""Cross-architecture A/B alignment of PQ layers (docs/method.md, "Aligning A and B across architectures").

Command line: ``fedmosaic align --anchor tiny-llama-s --other tiny-llama-m --other tiny-qwen2-s
--out DIR [--r 16] [--seed 0] [--public-data ROOT]``.

1. **Anchor** (the smallest model): A (r×d_in, orthonormal rows) and B (d_out×r, orthonormal
   columns) per PQ layer k and module m are the PQ-LoRA seeded initialisation
   (:func:`fedmosaic_core.pqlora.orthonormal_bases`), so the anchor file equals what
   ``inject_pqlora`` builds with the same seed.
2. **Token matching.** Both frozen models run on the same public samples. Text tokens are
   matched by dynamic time warping over their character spans in the sample's text (cost
   ``1 − IoU`` of the spans), so models with different tokenisers (Llama ↔ Qwen) line up;
   image-patch positions are matched one-to-one when both towers give the same patch count.
   The mean ``1 − IoU`` along the warping path is reported as the matching error (0 for equal
   tokenisers).
3. **A.** With ``x_a, x_o`` the inputs of module m of the k-th PQ layer at matched positions and
   ``z_a = A_a x_a`` the anchor latents, minimise over A_o::

       mean_rows ‖A_o x_o − z_a‖² / r  +  λ · ‖A_o A_oᵀ − I_r‖²_F / r²

   (the penalty is on the r×r Gram matrix of A's *rows*, normalised by its r² entries), then
   replace A_o by the nearest row-orthonormal matrix ``U·Vᵀ`` of its SVD ``A_o = U Σ Vᵀ``.
4. **B** by canonical correlation of the module outputs (centred ``X_a``, ``X_o``; γ = 1e-4)::

       S_aa = X_aᵀX_a + γI,  S_oo = X_oᵀX_o + γI,  S_oa = X_oᵀX_a
       U Σ Vᵀ = svd(S_oo^{-1/2} S_oa S_aa^{-1/2}),  T = (S_aa^{-1/2} V Uᵀ S_oo^{1/2})ᵀ,  B_o = T·B_a

   then (``b_normalisation="orthonormal"``, the default) B_o is replaced by its nearest
   column-orthonormal matrix, as A is in step 3. Raw ``T·B_a`` is badly conditioned: S_aa^{-1/2}
   amplifies output directions in which the anchor barely varies (measured on the tiny presets:
   singular values of B_o from 0.3 up to 2,573, against 1 for the anchor's B), so the same P
   moves the other model hundreds of times more than the anchor, and its local training
   degrades (BENCHMARKS.md). The polar factor keeps the CCA-mapped column space and orientation
   at the anchor's conditioning. ``"none"`` keeps the raw mapping of the reference.

   Measured per module on held-out samples (``b_transfer_*``): with Y ↦ Y·M the least-squares map
   from the other model's module outputs to the anchor's (fit samples), the mean cosine between
   ``M``-mapped update of the other model, ``B_o P A_o x_o``, and the anchor's update
   ``B_a P A_a x_a`` at matched tokens, for a random P: how much the same shared P does the same
   thing in both models.

Output per architecture: ``<fingerprint id>.safetensors`` (keys ``pq.{k}.{module}.A|B``) and
``<fingerprint id>.json`` (fingerprint, anchor, r, seed, metrics). :func:`load_aligned_bases`
puts such a file into an injected model, checking architecture, r and shapes first.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedmosaic_core.modeling import decoder_parts
from fedmosaic_core.pqlora.config import DEFAULT_TARGET_MODULES
from fedmosaic_core.pqlora.model import pq_layer_indices
from fedmosaic_core.pqlora.orthonormal import orthonormal_bases
from fedmosaic_core.pqlora.state import shared_key
from fedmosaic_core.storage import atomic_write_text, atomic_write_with

from .collate import SampleLike, collate, image_token_count, uses_own_chat_template
from .fingerprint import ArchitectureFingerprint
from .loading import LoadedModel
from .tokenizer import ASSISTANT_PREFIX, USER_PREFIX, answer_text

FORMAT_VERSION = 2  # 2: B orthonormalised after the CCA map
B_NORMALISATIONS = ("orthonormal", "none")


class AlignmentError(ValueError):
    """Bad input to alignment, or an A/B file that does not fit a model."""


@dataclass(frozen=True)
class AlignConfig:
    """Alignment settings. ``r``/``seed``/``target_modules``/``num_blocks`` must match the
    federation's ``PQLoRAConfig``."""

    r: int = 16
    seed: int = 0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    num_blocks: int = 4
    steps: int = 400
    lr: float = 1e-2
    ortho_weight: float = 1.0
    gamma: float = 1e-4
    held_out_fraction: float = 0.25
    max_samples: int = 160
    cca_samples: int = 100
    image_positions_per_image: int = 4
    batch_size: int = 16
    max_length: int = 512
    split_seed: int = 0
    b_normalisation: str = "orthonormal"

    def __post_init__(self) -> None:
        if self.b_normalisation not in B_NORMALISATIONS:
            raise AlignmentError(
                f"b_normalisation must be one of {B_NORMALISATIONS}, got {self.b_normalisation!r}"
            )
        if self.r <= 0 or self.steps <= 0 or self.batch_size <= 0 or self.num_blocks <= 0:
            raise AlignmentError(f"r, steps, batch_size and num_blocks must be positive: {self}")
        if not 0 < self.held_out_fraction < 1:
            raise AlignmentError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if self.gamma <= 0 or self.lr <= 0 or self.ortho_weight < 0:
            raise AlignmentError("gamma and lr must be > 0 and ortho_weight >= 0")
        if not self.target_modules:
            raise AlignmentError("target_modules must not be empty")


@dataclass
class AlignedBases:
    """A/B of every PQ layer/module of one model (``pq.{k}.{module}.A|B``) and metrics."""

    state: dict[str, torch.Tensor]
    fingerprint: ArchitectureFingerprint
    model_name: str
    anchor_fingerprint: ArchitectureFingerprint
    anchor_name: str
    seed: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "fingerprint_id": self.fingerprint.id,
            "model": self.model_name,
            "anchor": self.anchor_fingerprint.id,
            "anchor_model": self.anchor_name,
            "r": self.fingerprint.r,
            "seed": self.seed,
            "metrics": self.metrics,
        }


# --------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class Position:
    """One token of a collated sequence: a text token with its char span in the text-only
    string, an image patch, or a special token (BOS)."""

    kind: str  # "text" | "image" | "special"
    start: int = 0  # text: char span; image: image index
    end: int = 0  # text: char span end; image: patch index


def token_positions(processor: Any, sample: SampleLike, tokens_per_image: int) -> tuple[list[int], list[Position]]:
    """Ids exactly as :func:`collate` builds them (no truncation) and what each position is.

    Char spans refer to ``USER:`` + ``" " + prompt without <image>`` + ``\\nASSISTANT:`` +
    answer, identical for every tokenizer, so spans of two models are comparable.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if uses_own_chat_template(tokenizer):
        return _template_positions(tokenizer, sample)
    image_token = str(getattr(processor, "image_token", None) or "<image>")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    expanded = sample.prompt.replace(image_token, image_token * tokens_per_image)
    segments = [USER_PREFIX.rstrip(), " " + expanded, ASSISTANT_PREFIX,
                answer_text(sample.answer, tokenizer.eos_token)]
    ids: list[int] = []
    positions: list[Position] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        positions.append(Position("special"))
    offset = 0  # chars of the text-only string before this segment
    image_index, patch = -1, tokens_per_image
    for segment in segments:
        enc = tokenizer(segment, add_special_tokens=False, return_offsets_mapping=True)
        removed = 0  # image-token chars before the current token inside this segment
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            ids.append(int(token_id))
            if token_id == image_id:
                if patch >= tokens_per_image:
                    image_index, patch = image_index + 1, 0
                positions.append(Position("image", image_index, patch))
                patch += 1
                removed += end - start
            elif token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
                positions.append(Position("special"))
            else:
                positions.append(Position("text", offset + start - removed, offset + end - removed))
        offset += len(segment.replace(image_token, ""))
    return ids, positions


def _template_positions(tokenizer: Any, sample: SampleLike) -> tuple[list[int], list[Position]]:
    """:func:`token_positions` for a model that prompts in its own chat template (text only): the
    ids as :func:`.collate._own_template_ids` makes them; tokens of the prompt and the answer get
    the char spans those texts have in the fixed scaffold's string, the template's own tokens are
    special. So spans compare across models whatever template each uses."""
    if sample.images:
        raise AlignmentError(f"sample {sample.id!r}: aligning a chat-template model on image samples is not supported")
    prompt_start = len(USER_PREFIX)  # "USER:" + " " + prompt + "\nASSISTANT:" + " " + answer + eos
    answer_start = prompt_start + len(sample.prompt) + len(ASSISTANT_PREFIX) + 1
    user = [{"role": "user", "content": sample.prompt}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": sample.answer}], tokenize=False)
    ids: list[int] = []
    positions: list[Position] = []
    for text, content, canonical in ((prompt_text, sample.prompt, prompt_start),
                                     (full[len(prompt_text):], sample.answer.strip(), answer_start)):
        at = text.find(content)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            ids.append(int(token_id))
            lo, hi = max(start, at), min(end, at + len(content))
            if at < 0 or hi <= lo:
                positions.append(Position("special"))
            else:
                positions.append(Position("text", canonical + lo - at, canonical + hi - at))
    return ids, positions


def dtw_match(a: Sequence[Position], b: Sequence[Position]) -> tuple[list[tuple[int, int]], float]:
    """DTW over two text-token sequences with cost ``1 − IoU`` of their char spans.

    Returns the warping path as (i, j) index pairs and its mean cost (the matching error).
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return [], 0.0
    sa = np.array([[p.start, p.end] for p in a], dtype=np.float64)
    sb = np.array([[p.start, p.end] for p in b], dtype=np.float64)
    inter = np.clip(np.minimum(sa[:, None, 1], sb[None, :, 1]) - np.maximum(sa[:, None, 0], sb[None, :, 0]), 0, None)
    union = np.maximum(sa[:, None, 1], sb[None, :, 1]) - np.minimum(sa[:, None, 0], sb[None, :, 0])
    cost = 1.0 - inter / np.maximum(union, 1e-9)
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j], total[i, j - 1])
    path: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        steps = [(total[i - 1, j - 1], i - 1, j - 1), (total[i - 1, j], i - 1, j), (total[i, j - 1], i, j - 1)]
        _, i, j = min(steps, key=lambda s: s[0])
    path.reverse()
    return path, float(np.mean([cost[p, q] for p, q in path]))


def _matched_pairs(
    pos_a: list[Position], pos_o: list[Position], per_image: int
) -> tuple[list[tuple[int, int]], float]:
    text_a = [i for i, p in enumerate(pos_a) if p.kind == "text"]
    text_o = [i for i, p in enumerate(pos_o) if p.kind == "text"]
    path, error = dtw_match([pos_a[i] for i in text_a], [pos_o[j] for j in text_o])
    pairs = [(text_a[p], text_o[q]) for p, q in path]
    img_a = {(p.start, p.end): i for i, p in enumerate(pos_a) if p.kind == "image"}
    img_o = {(p.start, p.end): i for i, p in enumerate(pos_o) if p.kind == "image"}
    if img_a and len(img_a) == len(img_o) and set(img_a) == set(img_o):
        patches = sorted({patch for _, patch in img_a})
        keep = set(patches[:: max(1, len(patches) // max(1, per_image))][:per_image])
        pairs += [(img_a[key], img_o[key]) for key in sorted(img_a) if key[1] in keep]
    return pairs, error


# ----------------------------------------------------------------------------- capture
def pq_target_modules(model: nn.Module, config: AlignConfig) -> dict[tuple[int, str], nn.Module]:
    """``{(block k, module name): linear}`` for the PQ layers of ``model``'s language model."""
    parts = decoder_parts(model)
    indices = pq_layer_indices(len(parts.layers), config.num_blocks)
    found: dict[tuple[int, str], nn.Module] = {}
    for k, li in enumerate(indices):
        named = dict(parts.layers[li].named_modules())
        for target in config.target_modules:
            matches = [m for n, m in named.items() if n == target or n.endswith("." + target)]
            if len(matches) != 1:
                raise AlignmentError(
                    f"decoder layer {li}: target module {target!r} matched {len(matches)} modules"
                )
            module = matches[0]
            base = getattr(module, "base_layer", module)  # an injected adapter wraps the base
            found[(k, target)] = base
    return found


def _module_dims(module: Any) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


class _Capture:
    """Forward hooks recording the input and output of each target module of one forward."""

    def __init__(self, modules: dict[tuple[int, str], nn.Module]) -> None:
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._hook(key)) for key, module in modules.items()
        ]

    def _hook(self, key: tuple[int, str]) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.inputs[key] = args[0].detach().to("cpu", torch.float32)
            self.outputs[key] = output.detach().to("cpu", torch.float32)

        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class _Matched:
    """Rows gathered at matched positions: per (k, module) inputs/outputs of both models."""

    x_a: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    x_o: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    y_a: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    y_o: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)
    pairs: int = 0
    samples: int = 0

    def stacked(self, which: str, key: tuple[int, str]) -> torch.Tensor:
        return torch.cat(getattr(self, which)[key]).double()


def _run(loaded: LoadedModel, samples: Sequence[SampleLike], config: AlignConfig,
         modules: dict[tuple[int, str], nn.Module]) -> tuple[_Capture, list[list[Position]]]:
    model, processor = loaded.model, loaded.processor
    batch = collate(processor, samples, config.max_length)
    per_image = 0
    if "pixel_values" in batch:
        per_image = image_token_count(processor, batch["pixel_values"])
    positions = []
    for row, sample in enumerate(samples):
        ids, pos = token_positions(processor, sample, per_image)
        length = int(batch["attention_mask"][row].sum())
        if ids != batch["input_ids"][row, :length].tolist():
            raise AlignmentError(f"sample {sample.id!r}: token positions disagree with collate")
        positions.append(pos)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    capture = _Capture(modules)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        capture.close()
    return capture, positions


def _gather(anchor: LoadedModel, other: LoadedModel, samples: Sequence[SampleLike],
            config: AlignConfig, mods_a: dict[tuple[int, str], nn.Module],
            mods_o: dict[tuple[int, str], nn.Module], with_outputs: int) -> _Matched:
    matched = _Matched()
    for key in mods_a:
        matched.x_a[key], matched.x_o[key], matched.y_a[key], matched.y_o[key] = [], [], [], []
    for start in range(0, len(samples), config.batch_size):
        chunk = samples[start : start + config.batch_size]
        cap_a, pos_a = _run(anchor, chunk, config, mods_a)
        cap_o, pos_o = _run(other, chunk, config, mods_o)
        for row in range(len(chunk)):
            pairs, error = _matched_pairs(pos_a[row], pos_o[row], config.image_positions_per_image)
            matched.errors.append(error)
            if not pairs:
                continue
            ia = torch.tensor([p for p, _ in pairs])
            io = torch.tensor([q for _, q in pairs])
            keep_outputs = matched.samples < with_outputs
            for key in mods_a:
                matched.x_a[key].append(cap_a.inputs[key][row, ia])
                matched.x_o[key].append(cap_o.inputs[key][row, io])
                if keep_outputs:
                    matched.y_a[key].append(cap_a.outputs[key][row, ia])
                    matched.y_o[key].append(cap_o.outputs[key][row, io])
            matched.pairs += len(pairs)
            matched.samples += 1
    return matched


# -------------------------------------------------------------------------------- math
def nearest_row_orthonormal(a: torch.Tensor) -> torch.Tensor:
    """The row-orthonormal matrix closest to ``a`` in Frobenius norm: ``U·Vᵀ`` of ``a = UΣVᵀ``."""
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


def orthonormality_error(a: torch.Tensor) -> float:
    """‖A Aᵀ − I‖_F (rows of A)."""
    a = a.double()
    return float(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype)))


def fit_latent_matching_a(
    x_other: torch.Tensor, z_anchor: torch.Tensor, a_init: torch.Tensor, config: AlignConfig
) -> torch.Tensor:
    """Train A_o (r×d_o) on ``mean ‖x_o A_oᵀ − z_a‖²/r + λ‖A_oA_oᵀ − I‖²_F/r²`` then project.

    The MSE is evaluated through second moments (``C_xx = XᵀX/n``, ``C_xz = XᵀZ/n``):
    ``mean‖XAᵀ − Z‖² = tr(A C_xx Aᵀ) − 2 tr(A C_xz) + tr(ZᵀZ)/n`` (all divided by r), exact and
    independent of the number of rows n. It is divided by the latents' mean square so the
    penalty weight λ means the same for every module.
    """
    r = a_init.shape[0]
    x, z = x_other.double(), z_anchor.double()
    n = x.shape[0]
    c_xx, c_xz, zz = x.T @ x / n, x.T @ z / n, float((z * z).sum()) / n
    scale = max(zz / r, 1e-12)
    a = a_init.detach().double().clone().requires_grad_(True)
    eye = torch.eye(r, dtype=torch.float64)
    optimizer = torch.optim.Adam([a], lr=config.lr)
    for _ in range(config.steps):
        optimizer.zero_grad()
        mse = (torch.sum((a @ c_xx) * a) - 2 * torch.sum(a * c_xz.T) + zz) / (r * scale)
        ortho = (a @ a.T - eye).pow(2).sum() / (r * r)
        (mse + config.ortho_weight * ortho).backward()
        optimizer.step()
    return nearest_row_orthonormal(a.detach())


def _inv_sqrt_and_sqrt(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(s)
    values = values.clamp_min(1e-12)
    return (vectors * values.rsqrt()) @ vectors.T, (vectors * values.sqrt()) @ vectors.T


def cca_map_b(
    y_anchor: torch.Tensor, y_other: torch.Tensor, b_anchor: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, float]:
    """``B_o = T·B_a`` with T from regularised CCA of the outputs (docs/method.md, "Aligning A and B across architectures" step 3).

    Returns B_o and the mean canonical correlation (diagonal of Σ).
    """
    xa = y_anchor.double() - y_anchor.double().mean(0, keepdim=True)
    xo = y_other.double() - y_other.double().mean(0, keepdim=True)
    s_aa = xa.T @ xa + gamma * torch.eye(xa.shape[1], dtype=torch.float64)
    s_oo = xo.T @ xo + gamma * torch.eye(xo.shape[1], dtype=torch.float64)
    s_oa = xo.T @ xa
    s_aa_inv_half, _ = _inv_sqrt_and_sqrt(s_aa)
    s_oo_inv_half, s_oo_half = _inv_sqrt_and_sqrt(s_oo)
    u, sigma, vh = torch.linalg.svd(s_oo_inv_half @ s_oa @ s_aa_inv_half, full_matrices=False)
    transform = (s_aa_inv_half @ vh.T @ u.T @ s_oo_half).T  # d_o × d_a
    return transform @ b_anchor.double(), float(sigma.mean())


def output_map(y_other: torch.Tensor, y_anchor: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Least-squares M (d_o × d_a) with ``Y_o M ≈ Y_a`` (centred, ridge relative to the trace)."""
    yo = y_other.double() - y_other.double().mean(0, keepdim=True)
    ya = y_anchor.double() - y_anchor.double().mean(0, keepdim=True)
    gram = yo.T @ yo
    gram += ridge * float(torch.trace(gram)) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, yo.T @ ya)


def update_transfer_cosine(
    x_anchor: torch.Tensor, x_other: torch.Tensor, a_anchor: torch.Tensor, b_anchor: torch.Tensor,
    a_other: torch.Tensor, b_other: torch.Tensor, out_map: torch.Tensor, seed: int,
) -> float:
    """Mean cosine of ``(B_o P A_o x_o) M`` and ``B_a P A_a x_a`` over matched rows, random P."""
    r = a_anchor.shape[0]
    p = torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upd_a = x_anchor.double() @ a_anchor.double().T @ p.T @ b_anchor.double().T
    upd_o = x_other.double() @ a_other.double().T @ p.T @ b_other.double().T
    return mean_cosine(upd_o @ out_map, upd_a)


def mean_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean over rows of cos(u_i, v_i)."""
    return float(torch.nn.functional.cosine_similarity(u.double(), v.double(), dim=1, eps=1e-12).mean())


def linear_cka(u: torch.Tensor, v: torch.Tensor) -> float:
    """Linear CKA of two row-aligned representations (centred)."""
    u = u.double() - u.double().mean(0)
    v = v.double() - v.double().mean(0)
    cross = torch.linalg.matrix_norm(u.T @ v) ** 2
    return float(cross / (torch.linalg.matrix_norm(u.T @ u) * torch.linalg.matrix_norm(v.T @ v)).clamp_min(1e-30))


# ----------------------------------------------------------------------------- main API
def anchor_bases(anchor: LoadedModel, config: AlignConfig) -> dict[str, torch.Tensor]:
    """The anchor's seeded orthonormal A/B (same as ``inject_pqlora`` with ``config.seed``)."""
    state: dict[str, torch.Tensor] = {}
    for (k, name), module in pq_target_modules(anchor.model, config).items():
        d_in, d_out = _module_dims(module)
        _check_rank(anchor.name, k, name, d_in, d_out, config.r)
        a, b = orthonormal_bases(d_in, d_out, config.r, config.seed, k, name)
        state[shared_key(k, name, "A")], state[shared_key(k, name, "B")] = a, b
    return state


def _check_rank(model: str, k: int, name: str, d_in: int, d_out: int, r: int) -> None:
    if r > min(d_in, d_out):
        raise AlignmentError(
            f"{model}: r={r} is too large for PQ layer {k} module {name!r} (d_in={d_in}, "
            f"d_out={d_out}); r must be ≤ both"
        )


def _split(samples: Sequence[SampleLike], config: AlignConfig,
           both_multimodal: bool) -> tuple[list[SampleLike], list[SampleLike]]:
    usable = [s for s in samples if both_multimodal or not s.images]
    if len(usable) < 4:
        raise AlignmentError(f"alignment needs at least 4 usable public samples, got {len(usable)}")
    order = list(range(len(usable)))
    random.Random(config.split_seed).shuffle(order)
    chosen = [usable[i] for i in order[: config.max_samples]]
    n_held = max(1, int(len(chosen) * config.held_out_fraction))
    return chosen[n_held:], chosen[:n_held]


def align_bases(
    anchor: LoadedModel,
    other: LoadedModel,
    public_samples: Sequence[SampleLike],
    config: AlignConfig | None = None,
) -> AlignedBases:
    """Aligned A/B of ``other`` against ``anchor`` (module docstring), with held-out metrics:
    mean cosine and linear CKA of the r-dim latents ``A·x`` of both models at matched tokens,
    before (other's own seeded A) and after alignment, per module and averaged."""
    config = config or AlignConfig()
    start = time.perf_counter()
    both_multimodal = anchor.is_multimodal and other.is_multimodal
    train, held_out = _split(public_samples, config, both_multimodal)
    mods_a = pq_target_modules(anchor.model, config)
    mods_o = pq_target_modules(other.model, config)
    base_a = anchor_bases(anchor, config)
    fit = _gather(anchor, other, train, config, mods_a, mods_o, with_outputs=config.cca_samples)
    test = _gather(anchor, other, held_out, config, mods_a, mods_o, with_outputs=0)
    state: dict[str, torch.Tensor] = {}
    per_module: dict[str, dict[str, float]] = {}
    for (k, name), module in mods_o.items():
        d_in, d_out = _module_dims(module)
        _check_rank(other.name, k, name, d_in, d_out, config.r)
        a_anchor, b_anchor = base_a[shared_key(k, name, "A")].double(), base_a[shared_key(k, name, "B")]
        a_init, _ = orthonormal_bases(d_in, d_out, config.r, config.seed, k, name)
        key = (k, name)
        z_fit = fit.stacked("x_a", key) @ a_anchor.T
        a_other = fit_latent_matching_a(fit.stacked("x_o", key), z_fit, a_init, config)
        y_a, y_o = fit.stacked("y_a", key), fit.stacked("y_o", key)
        b_cca, canonical = cca_map_b(y_a, y_o, b_anchor, config.gamma)
        b_other = nearest_row_orthonormal(b_cca.T).T if config.b_normalisation == "orthonormal" else b_cca
        state[shared_key(k, name, "A")] = a_other.float().contiguous()
        state[shared_key(k, name, "B")] = b_other.float().contiguous()
        x_a_test = test.stacked("x_a", key)
        z_test = x_a_test @ a_anchor.T
        x_test = test.stacked("x_o", key)
        _, b_init = orthonormal_bases(d_in, d_out, config.r, config.seed, k, name)
        out_map = output_map(y_o, y_a)

        transfer = partial(update_transfer_cosine, x_a_test, x_test, a_anchor, b_anchor, a_other)

        singular = torch.linalg.svdvals(b_cca)
        per_module[f"pq.{k}.{name}"] = {
            "cosine_before": mean_cosine(x_test @ a_init.double().T, z_test),
            "cosine_after": mean_cosine(x_test @ a_other.T, z_test),
            "cka_before": linear_cka(x_test @ a_init.double().T, z_test),
            "cka_after": linear_cka(x_test @ a_other.T, z_test),
            "orthonormality_error_A": orthonormality_error(state[shared_key(k, name, "A")]),
            "cca_mean_correlation": canonical,
            "b_transfer_seeded": transfer(b_init.double(), out_map, config.seed + k),
            "b_transfer_cca_raw": transfer(b_cca, out_map, config.seed + k),
            "b_transfer_after": transfer(b_other, out_map, config.seed + k),
            "cca_raw_b_condition": float(singular.max() / singular.min().clamp_min(1e-30)),
            "cca_raw_b_max_singular": float(singular.max()),
        }
    stats = ("cosine_before", "cosine_after", "cka_before", "cka_after", "cca_mean_correlation",
             "b_transfer_seeded", "b_transfer_cca_raw", "b_transfer_after")
    summary = {stat: float(np.mean([m[stat] for m in per_module.values()])) for stat in stats}
    summary["max_orthonormality_error_A"] = max(m["orthonormality_error_A"] for m in per_module.values())
    summary["cca_raw_b_max_singular"] = max(m["cca_raw_b_max_singular"] for m in per_module.values())
    metrics = {
        **summary,
        "token_matching_error_fit": float(np.mean(fit.errors)) if fit.errors else 0.0,
        "token_matching_error_held_out": float(np.mean(test.errors)) if test.errors else 0.0,
        "fit_samples": fit.samples, "fit_positions": fit.pairs,
        "held_out_samples": test.samples, "held_out_positions": test.pairs,
        "seconds": time.perf_counter() - start,
        "config": {**asdict(config), "target_modules": list(config.target_modules)},
        "per_module": per_module,
    }
    anchor_fp = anchor.fingerprint.with_rank(config.r)
    return AlignedBases(state, other.fingerprint.with_rank(config.r), other.name, anchor_fp,
                        anchor.name, config.seed, metrics)


def anchor_aligned_bases(anchor: LoadedModel, config: AlignConfig) -> AlignedBases:
    """The anchor's own file: its seeded orthonormal A/B."""
    fp = anchor.fingerprint.with_rank(config.r)
    state = anchor_bases(anchor, config)
    metrics = {"max_orthonormality_error_A": max(
        orthonormality_error(v) for key, v in state.items() if key.endswith(".A"))}
    return AlignedBases(state, fp, anchor.name, fp, anchor.name, config.seed, metrics)


def alignment_summary(metrics: dict[str, Any]) -> str:
    """One readable line of an alignment's quality figures."""
    return (f"latent cosine {metrics['cosine_before']:.3f} -> {metrics['cosine_after']:.3f}, "
            f"CKA {metrics['cka_before']:.3f} -> {metrics['cka_after']:.3f}, "
            f"max ||AA^T-I|| {metrics['max_orthonormality_error_A']:.1e}, "
            f"token matching error {metrics['token_matching_error_held_out']:.3f}, "
            f"{metrics['seconds']:.1f} s")


# ------------------------------------------------------------------------------- files
def save_aligned_bases(bases: AlignedBases, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``<fingerprint id>.safetensors`` + ``.json`` into ``out_dir``; returns the tensor file."""
    out = Path(out_dir)
    stem = bases.fingerprint.id
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(bases.state.items())}
    meta = {"fingerprint_id": stem, "anchor": bases.anchor_fingerprint.id, "r": str(bases.fingerprint.r)}
    atomic_write_with(out / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
    text = json.dumps(bases.metadata(), indent=2, sort_keys=True) + "\n"
    atomic_write_text(out / f"{stem}.json", text)
    return out / f"{stem}.safetensors"


def _resolve_bases_file(path: Path, fingerprint: ArchitectureFingerprint) -> Path:
    if path.is_dir():
        candidate = path / f"{fingerprint.id}.safetensors"
        if not candidate.is_file():
            available = sorted(p.stem for p in path.glob("*.safetensors"))
            raise AlignmentError(
                f"{path} holds no A/B file for architecture {fingerprint.id}; available: {available}"
            )
        return candidate
    if not path.is_file():
        raise AlignmentError(f"A/B file {path} does not exist")
    return path


def read_aligned_bases(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (safetensors, no pickle) and the JSON description next to them."""
    file = Path(path)
    meta_path = file.with_suffix(".json")
    if not meta_path.is_file():
        raise AlignmentError(f"{file}: the JSON description {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AlignmentError(f"{meta_path}: not valid JSON ({error})") from None
    try:
        state = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types
        raise AlignmentError(f"{file}: not a readable safetensors file ({error})") from None
    return state, meta


def load_aligned_bases(pq_model: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Replace the PQ-layer A/B of an injected model (``PQLoRAModel``) from an alignment file
    (or the directory holding one per architecture). Checks, before writing anything: the
    file's r equals the model's r, its architecture equals the model's, every A is r×d_in and
    every B d_out×r of the model's modules. Returns the JSON description."""
    r = int(pq_model.pqlora_config.r)
    fingerprint = ArchitectureFingerprint.of(pq_model.base_model, r=r)
    file = _resolve_bases_file(Path(path), fingerprint)
    state, meta = read_aligned_bases(file)
    file_r = meta.get("r")
    if file_r != r:
        raise AlignmentError(f"{file}: A/B were aligned with r={file_r} but the model uses r={r}")
    file_fp = meta.get("fingerprint_id")
    if file_fp != fingerprint.id:
        raise AlignmentError(
            f"{file}: A/B belong to architecture {file_fp}, the model is {fingerprint.id}"
        )
    expected = pq_model.pq_bases()
    problems = []
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            problems.append(f"missing {key}")
        elif key not in expected:
            problems.append(f"unexpected {key}")
        elif tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, the model needs {tuple(expected[key].shape)}")
    if problems:
        raise AlignmentError(f"{file} does not fit the model: " + "; ".join(problems[:8]))
    pq_model.load_pq_bases(state)
    return dict(meta)
