"""Client-side task vector: the closed-form gradient of the answer-token loss w.r.t. the last
decoder layer's MLP down-projection weight, without a backward pass.

With ``h`` the last decoder layer's output (the input of the final RMSNorm), ``u`` the input of
that layer's ``down_proj`` (captured by a forward pre-hook), ``w`` the final-norm weight,
``r = 1/sqrt(mean(h²) + eps)`` and ``x̂ = h·r``::

    logits = (w ⊙ x̂) · W_lmᵀ
    δ      = (softmax(logits) − onehot(y)) / n_answer             # answer tokens only
    g_h    = δ · W_lm                                            # grad at the final-norm output
    exact:     g_res = r · (g_h⊙w − x̂ · mean(g_h⊙w ⊙ x̂))           # full RMSNorm Jacobian
    diagonal:  g_res = g_h ⊙ w · r · (1 − x̂²/d)                    # the reference's approximation
    G      = g_resᵀ · u                                           # d_model × d_ff

Since ``down_proj`` adds to the residual stream right before the final norm and nothing after it
mixes positions, ``G`` is exactly ``∂L/∂W_down`` of the mean answer-token cross-entropy
(labels shifted by one, ``-100`` ignored) — the same number autograd gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fedmosaic_core.modeling import IGNORE_INDEX, decoder_parts
from fedmosaic_core.pqlora.model import gate_pooling

_VOCAB_CHUNK = 32768


class _StopForward(Exception):
    """Raised from the final-norm hook: nothing after the norm is needed."""


def _find_down_proj(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None) if mlp is not None else None
    if isinstance(down, nn.Module):
        return down
    for name, module in layer.named_modules():
        if name.endswith("down_proj"):
            return module
    raise TypeError(
        f"{type(layer).__name__}: the last decoder layer has no MLP `down_proj` "
        "(expected a Llama/Qwen2-style gated MLP)"
    )


def _norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise TypeError(f"{type(norm).__name__}: cannot find the RMSNorm epsilon")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense tensor (dequantised if it is bitsandbytes 4-bit)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no `weight`")
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state)
    return weight.detach()


def _fp32_chunks(weight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Row chunks of ``weight`` in fp32 (no full fp32 copy of a large low-precision lm_head)."""
    if weight.dtype == torch.float32:
        yield 0, weight
        return
    for start in range(0, weight.shape[0], _VOCAB_CHUNK):
        yield start, weight[start : start + _VOCAB_CHUNK].float()


class TaskVectorProbe:
    """Closed-form task-vector gradient of a frozen causal LM or LLaVA-style model.

    ``gradient(batch)`` runs one forward pass under ``torch.no_grad`` (stopped right after the
    final norm), and returns ``∂L/∂W_down`` of the last decoder layer (d_model × d_ff, fp32) for
    the mean cross-entropy over answer tokens. Works for 4-bit probes: only the input of
    ``down_proj`` is used, never its weight. The model's train/eval mode is left as it is.
    """

    def __init__(self, model: nn.Module, exact_rmsnorm: bool = True) -> None:
        parts = decoder_parts(model)
        config = parts.config
        if getattr(config, "final_logit_softcapping", None) is not None:
            raise NotImplementedError("TaskVectorProbe: final-logit soft-capping is not supported")
        norm_weight = getattr(parts.final_norm, "weight", None)
        if not isinstance(norm_weight, torch.Tensor):
            raise TypeError(f"{type(parts.final_norm).__name__}: the final norm has no weight")
        self.model = model
        self.exact_rmsnorm = bool(exact_rmsnorm)
        self.final_norm = parts.final_norm
        self.norm_weight: torch.Tensor = norm_weight
        self.lm_head = parts.lm_head
        self.down_proj = _find_down_proj(parts.layers[-1])
        self.norm_eps = _norm_eps(parts.final_norm)
        self.d_model = int(norm_weight.shape[0])
        d_ff = getattr(self.down_proj, "in_features", None) or getattr(config, "intermediate_size", None)
        if d_ff is None:
            raise TypeError("TaskVectorProbe: cannot determine d_ff (down_proj.in_features)")
        self.d_ff = int(d_ff)

    def _capture(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def down_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured["u"] = args[0]

        def norm_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured["h"] = args[0]
            raise _StopForward

        handles = [
            self.down_proj.register_forward_pre_hook(down_hook),
            self.final_norm.register_forward_pre_hook(norm_hook),
        ]
        try:
            self.model(**inputs, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "h" not in captured or "u" not in captured:
            raise RuntimeError("TaskVectorProbe: the forward pass did not reach the final norm")
        return captured["h"], captured["u"]

    @torch.no_grad()
    def gradient(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """∂(mean answer-token CE)/∂W_down of the last layer, d_model × d_ff, fp32."""
        if "labels" not in batch:
            raise ValueError("TaskVectorProbe.gradient: the batch has no `labels`")
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with gate_pooling(self.model, batch.get("attention_mask"), labels):
            h, u = self._capture(inputs)
        if h.shape[:2] != labels.shape:
            raise ValueError(
                f"TaskVectorProbe.gradient: labels have shape {tuple(labels.shape)} but the "
                f"hidden states have (batch, seq) = {tuple(h.shape[:2])}"
            )
        shifted = labels[:, 1:].to(h.device)
        mask = shifted != IGNORE_INDEX
        n_answer = int(mask.sum())
        if n_answer == 0:
            raise ValueError("TaskVectorProbe.gradient: the batch has no answer tokens (all -100)")
        target = shifted[mask]
        h_a = h[:, :-1][mask].float()  # n × d
        u_a = u[:, :-1][mask].float()  # n × d_ff

        r = torch.rsqrt(h_a.pow(2).mean(-1, keepdim=True) + self.norm_eps)  # n × 1
        x_hat = h_a * r
        w_norm = self.norm_weight.detach().float()
        normed = x_hat * w_norm

        weight = _dense_weight(self.lm_head)
        bias = getattr(self.lm_head, "bias", None)
        vocab = weight.shape[0]
        logits = torch.empty(n_answer, vocab, dtype=torch.float32, device=h_a.device)
        for start, chunk in _fp32_chunks(weight):
            logits[:, start : start + chunk.shape[0]] = normed @ chunk.T
        if bias is not None:
            logits += bias.detach().float()
        if int(target.max()) >= vocab or int(target.min()) < 0:
            raise ValueError(f"TaskVectorProbe.gradient: a label is outside the vocabulary [0, {vocab})")

        delta = torch.softmax(logits, dim=-1)
        delta[torch.arange(n_answer, device=delta.device), target] -= 1.0
        delta /= n_answer
        g_h = torch.zeros(n_answer, self.d_model, dtype=torch.float32, device=h_a.device)
        for start, chunk in _fp32_chunks(weight):
            g_h += delta[:, start : start + chunk.shape[0]] @ chunk

        g_w = g_h * w_norm
        if self.exact_rmsnorm:
            g_res = r * (g_w - x_hat * (g_w * x_hat).mean(-1, keepdim=True))
        else:
            g_res = g_w * r * (1.0 - x_hat.pow(2) / self.d_model)
        return g_res.T @ u_a
