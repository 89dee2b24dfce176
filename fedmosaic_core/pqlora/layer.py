"""PQ-LoRA and plain dual-LoRA layers around a linear-like base (docs/method.md, "PQ-LoRA").

Every adapted layer computes, for an input row vector x,

    h = base(x) + β · G(x) + (1 − β) · L(x)

where L is the trainable *local* branch, G the frozen *global* branch (replaced by the server
every round) and β ∈ (0, 1) a learned, input-dependent gate, one scalar per sample:

    logit = mean over the sample's T prompt tokens of (x_t · w_gate + σ·ε_t)
          = (mean_t x_t) · w_gate + (σ/√T)·ε                          (w_gate: d_in × 1, zero-init)
    β     = sigmoid(logit)                                            (β = ½ at initialisation)

The noise term (training mode, when enabled) is the reference's per-token noise,
σ = softplus(x · w_noise) + 1e-5 with w_noise never trained from 0, i.e. σ = ln 2 + 1e-5, averaged
with the tokens: the pooled logit's noise has std σ/√T, drawn directly as one N(0, σ²/T) per sample.

PQ layers (:class:`PQLoRALinear`) use, with frozen orthonormal A (r × d_in) and B (d_out × r)
shared by both branches and s = alpha / r,

    branch(x) = s · ((dropout(x) · Aᵀ) · P + Q) · Bᵀ                  (P: r × r, Q: r; zero-init)

All other layers (:class:`DualLoRALinear`) use a plain LoRA per branch,
``branch(x) = s · (dropout(x) · Aᵀ) · Bᵀ`` (A: lora_r × d_in Kaiming-uniform, B: d_out × lora_r
zero-init, s = alpha / lora_r). They carry a gate too, so the dual mixing is the same in every
adapted layer (the paper only describes the gate for PQ layers; a gate per layer is the choice
made here so that one rule, ``h = W·x + β·G + (1−β)·L``, holds everywhere).

The gate pools over the *prompt*: the sample's real tokens that are not answer tokens (no
padding, no ``labels``). Were the answer in the mean, every position's β would depend on the
answer that the position is trained to predict, a path around the causal mask that a gate learns
to use: training loss falls to ~0 while held-out predictions do not improve. In incremental
decoding β stays the prompt's, so an answer is generated with the β it is scored and trained with.

Both branches see the same dropout sample. The adapter runs in float32 (its parameters are
float32; the input is cast, the result is cast back to the base output's dtype).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES: tuple[str, str] = ("local", "global")
GATE_NOISE_STD = math.log(2.0) + 1e-5  # softplus(x·w_noise) + 1e-5 with w_noise fixed at 0
ADAPTER_DTYPE = torch.float32


@dataclass(frozen=True)
class LowRankUpdate:
    """A linear update ``x ↦ x·(up·down)ᵀ + bias``: ``down`` k × d_in, ``up`` d_out × k,
    ``bias`` d_out or None (float32)."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class GateContext:
    """State shared by the model wrapper and all adapted layers of one model.

    ``prompt_mask`` (batch × tokens, 1 = a prompt token the gates pool over) of the current
    top-level forward; it is kept until the next forward so that activation checkpointing
    recomputes the same gates. ``pinned``: set while a caller fixes ``prompt_mask`` for calls that
    bypass the wrapper (:func:`.model.gate_pooling`). ``fixed_beta`` overrides every gate with a
    constant β (e.g. 0.0: local branch only). While ``observing``, every layer adds the β of
    each forward's samples to its observed sum (:meth:`PQLoRAModel.observed_betas`).
    """

    prompt_mask: torch.Tensor | None = None
    pinned: bool = False
    fixed_beta: float | None = None
    observing: bool = False
    _pooling_of: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _pooling: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def pooling(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(weights, counts, noise std) of ``prompt_mask``: the mask as ``dtype`` (batch × tokens),
        its prompt lengths T (batch × 1, at least 1) and the pooled logit's noise std σ/√T
        (batch); computed once per mask, device and dtype, so not again in every adapted layer."""
        mask = self.prompt_mask
        if mask is None:
            raise ValueError("GateContext.pooling needs a prompt mask")
        if self._pooling_of is not mask:
            self._pooling_of, self._pooling = mask, {}
        cached = self._pooling.get((device, dtype))
        if cached is None:
            weights = mask.to(device=device, dtype=dtype)
            counts = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
            cached = (weights, counts, GATE_NOISE_STD / counts.squeeze(-1).sqrt())
            self._pooling[(device, dtype)] = cached
        return cached


def base_kind(base: nn.Module) -> str:
    """``"4bit"``, ``"8bit"`` or ``"linear"`` for a supported base; ``TypeError`` otherwise."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if isinstance(base, bnb.nn.Linear4bit):
            return "4bit"
        if isinstance(base, bnb.nn.Linear8bitLt):
            return "8bit"
    if isinstance(base, nn.Linear):
        return "linear"
    raise TypeError(
        f"cannot adapt a {type(base).__name__}: expected torch.nn.Linear, "
        "bitsandbytes Linear4bit or Linear8bitLt"
    )


def _unpack_cpu_4bit(base: Any) -> None:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking (which has no backward pass), if done."""
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        base.weight.data, base.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
            base.weight.data, quant_state
        )


def dense_weight(base: Any) -> torch.Tensor:
    """The base's weight (d_out × d_in) as a dense tensor; quantised bases are dequantised to
    float32 (4-bit: ``dequantize_4bit``; 8-bit: CB · SCB / 127 per row)."""
    kind = base_kind(base)
    if kind == "linear":
        return base.weight.detach()
    import bitsandbytes.functional as bnbf

    if kind == "4bit":
        _unpack_cpu_4bit(base)
        weight = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
        return weight.to(torch.float32)
    state = base.state
    if getattr(state, "has_fp16_weights", False):
        return base.weight.detach().to(torch.float32)
    cb = state.CB if state.CB is not None else base.weight.data
    scb = state.SCB if state.SCB is not None else base.weight.SCB
    return cb.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) / 127.0)


class _GatedDualAdapter(nn.Module):
    """Common part of both layer types: base dispatch, gate, dropout and the mixing rule."""

    def __init__(
        self,
        base_layer: Any,
        context: GateContext,
        *,
        dropout: float,
        gate_noise: bool,
    ) -> None:
        super().__init__()
        self.base_kind = base_kind(base_layer)
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        if self.base_kind == "4bit":
            # docs/method.md, "Offline models": an eval-mode, no-grad CPU forward would repack the 4-bit weights into
            # a layout without backward, silently dropping gradients in later training.
            base_layer.support_avx512bf16_for_cpu = False
            _unpack_cpu_4bit(base_layer)
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        self.context = context
        self.gate_noise = bool(gate_noise)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate = nn.Linear(
            self.in_features, 1, bias=False, device=self.device, dtype=ADAPTER_DTYPE
        )
        nn.init.zeros_(self.gate.weight)
        self._decoding_beta: torch.Tensor | None = None  # the last prompt's β, kept for decoding
        # Σ β and count of the samples seen in training mode; the same while the context observes
        self._trained_beta: tuple[torch.Tensor | float, int] = (0.0, 0)
        self._observed_beta: tuple[torch.Tensor | float, int] = (0.0, 0)

    @property
    def device(self) -> torch.device:
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        return weight.device

    # -- gate ------------------------------------------------------------------------------
    def _prompt_mask(self, batch: int, tokens: int, ndim: int) -> torch.Tensor | None:
        mask = self.context.prompt_mask
        if mask is None or mask.ndim != 2 or ndim != 3:
            return None
        if mask.shape[0] != batch or mask.shape[1] < tokens:
            raise ValueError(
                f"gate prompt mask of shape {tuple(mask.shape)} does not fit a layer input of "
                f"{batch} samples × {tokens} tokens"
            )
        return mask

    def gate_beta(self, x3: torch.Tensor, input_ndim: int = 3) -> torch.Tensor:
        """β per sample (shape ``(batch,)``, float32) for ``x3`` of shape batch × tokens × d_in."""
        batch, tokens, _ = x3.shape
        if self.context.fixed_beta is not None:
            return torch.full((batch,), float(self.context.fixed_beta), device=x3.device)
        mask = self._prompt_mask(batch, tokens, input_ndim)
        if mask is not None and tokens < mask.shape[1]:
            # Incremental decoding: the layer sees the newest tokens only; β stays the prompt's.
            kept = self._decoding_beta
            if kept is None or kept.shape[0] != batch:
                raise ValueError(
                    f"incremental decoding of {batch} samples without a prompt forward of the same "
                    "batch before it: the gate has no prompt β to keep"
                )
            return kept
        noise_std: torch.Tensor | float
        if mask is None:
            pooled = x3.mean(dim=1)
            noise_std = GATE_NOISE_STD / math.sqrt(tokens)
        else:
            weights, counts, noise_std = self.context.pooling(x3.device, x3.dtype)
            pooled = torch.einsum("ntd,nt->nd", x3, weights) / counts
        logit = F.linear(pooled, self.gate.weight).squeeze(-1)
        if self.training and self.gate_noise:  # the mean of T tokens' N(0, σ²) noise
            logit = logit + torch.randn_like(logit) * noise_std
        beta = torch.sigmoid(logit)
        self._decoding_beta = None if self.training else beta.detach()
        if self.training:  # summed on the device: no host copy per layer and step
            total, count = self._trained_beta
            self._trained_beta = (total + beta.detach().sum(), count + batch)
        return beta

    def trained_beta_sum(self, reset: bool = False) -> tuple[float, int]:
        """(Σ β, samples) of this gate over its training-mode forwards since the last reset (a β fixed
        by ``set_fixed_beta`` is not counted)."""
        total, count = self._trained_beta
        if reset:
            self._trained_beta = (0.0, 0)
        return float(total), count

    def observed_beta_sum(self, reset: bool = False) -> tuple[float, int]:
        """(Σ β, samples) of this gate over the forwards made while the context was observing."""
        total, count = self._observed_beta
        if reset:
            self._observed_beta = (0.0, 0)
        return float(total), count

    def select_decoding_rows(self, indices: torch.Tensor) -> None:
        """Keep the prompt β of rows ``indices`` (repeats allowed), as a cache's batch is reindexed."""
        if self._decoding_beta is not None:
            self._decoding_beta = self._decoding_beta[indices.to(self._decoding_beta.device)]

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        xf = x.to(ADAPTER_DTYPE)
        # batch × tokens × d_in; a 1-D/2-D input is a batch of single-token samples
        if xf.ndim >= 3:
            x3 = xf.reshape(-1, xf.shape[-2], xf.shape[-1])
        else:
            x3 = xf.reshape(-1, 1, xf.shape[-1])
        beta = self.gate_beta(x3, xf.ndim)
        if self.context.observing:
            total, count = self._observed_beta
            self._observed_beta = (total + beta.detach().sum().float(), count + int(beta.shape[0]))
        delta = self.mixed_delta(self.dropout(x3), beta)
        return result + delta.reshape(result.shape).to(result.dtype)

    def mixed_delta(self, x3: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """β·G(x) + (1−β)·L(x) for ``x3`` (batch × tokens × d_in, already dropped out)."""
        raise NotImplementedError

    def low_rank_update(self, beta: float) -> LowRankUpdate:
        """The update ``β·G(x) + (1−β)·L(x) = x·(up·down)ᵀ + bias`` for a constant β, factored
        (float32): what a merge adds to the base and what a LoRA adapter file holds."""
        raise NotImplementedError

    def delta_weight_and_bias(self, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δb) with ``β·G(x) + (1−β)·L(x) = x·ΔWᵀ + Δb`` for a constant β (float32)."""
        update = self.low_rank_update(beta)
        return update.up @ update.down, update.bias

    def global_is_zero(self) -> bool:
        """Whether the global branch G outputs exactly 0 (no global has been loaded into it)."""
        raise NotImplementedError

    def merged_linear(self, beta: float, dequantize: bool = False,
                      dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A dense ``nn.Linear`` equal to this layer with the gate fixed at ``beta``, computed as
        W + ΔW in float32 and stored in the base's dtype.

        Quantised bases need ``dequantize=True``: the merged layer is then stored in ``dtype``
        (the dtype the rest of the model computes in).
        A bias is added where the base had none if the adapter contributes one (Q ≠ 0).
        """
        if self.base_kind != "linear" and not dequantize:
            raise ValueError(
                f"cannot merge into a {self.base_kind} quantised base without dequantising; "
                "pass dequantize=True to get a dense layer"
            )
        weight = dense_weight(self.base_layer)
        dtype = weight.dtype if self.base_kind == "linear" else dtype
        delta_w, delta_b = self.delta_weight_and_bias(beta)
        base_bias: torch.Tensor | None = self.base_layer.bias  # type: ignore[assignment]
        has_bias = base_bias is not None or (delta_b is not None and bool(delta_b.ne(0).any()))
        merged = nn.Linear(
            self.in_features, self.out_features, bias=has_bias, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            merged.weight.copy_((weight.to(torch.float32) + delta_w.to(weight.device)).to(dtype))
            if merged.bias is not None:
                bias = torch.zeros(self.out_features, device=weight.device, dtype=torch.float32)
                if base_bias is not None:
                    bias += base_bias.detach().to(torch.float32)
                if delta_b is not None:
                    bias += delta_b.to(weight.device)
                merged.bias.copy_(bias.to(dtype))
        merged.requires_grad_(False)
        return merged

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, base={self.base_kind}"


def _branch_dict(make: Any, trainable_local: bool = True) -> nn.ParameterDict:
    return nn.ParameterDict(
        {
            "local": nn.Parameter(make(), requires_grad=trainable_local),
            "global": nn.Parameter(make(), requires_grad=False),
        }
    )


class PQLoRALinear(_GatedDualAdapter):
    """PQ layer: ``s · ((dropout(x)·Aᵀ)·P + Q)·Bᵀ`` per branch, frozen A/B shared by both.

    Mixed over the branches with a per-sample β the update is (fused into one path)
    ``s · ((x·Aᵀ)·P_β + Q_β)·Bᵀ`` with ``P_β = (1−β)·P_local + β·P_global`` (same for Q);
    as a dense update ``ΔW = s·B·P_βᵀ·A`` and bias ``Δb = s·B·Q_β``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        context: GateContext,
        *,
        r: int,
        alpha: float,
        A: torch.Tensor,
        B: torch.Tensor,
        dropout: float = 0.0,
        gate_noise: bool = True,
    ) -> None:
        super().__init__(base_layer, context, dropout=dropout, gate_noise=gate_noise)
        if tuple(A.shape) != (r, self.in_features) or tuple(B.shape) != (self.out_features, r):
            raise ValueError(
                f"PQ bases must be A {(r, self.in_features)} and B {(self.out_features, r)}, "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.r = int(r)
        self.scaling = float(alpha) / self.r
        device = self.device
        self.pq_A = nn.Parameter(A.to(device, ADAPTER_DTYPE).clone(), requires_grad=False)
        self.pq_B = nn.Parameter(B.to(device, ADAPTER_DTYPE).clone(), requires_grad=False)
        self.pq_P = _branch_dict(lambda: torch.zeros(r, r, device=device, dtype=ADAPTER_DTYPE))
        self.pq_Q = _branch_dict(lambda: torch.zeros(r, device=device, dtype=ADAPTER_DTYPE))

    def mixed_delta(self, x3: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        p_local, p_global = self.pq_P["local"], self.pq_P["global"]
        q_local, q_global = self.pq_Q["local"], self.pq_Q["global"]
        b3 = beta.to(ADAPTER_DTYPE).view(-1, 1, 1)
        p_mix = (p_local + b3 * (p_global - p_local)) * s  # batch × r × r
        q_mix = (q_local + b3 * (q_global - q_local)) * s  # batch × 1 × r
        latent = torch.baddbmm(q_mix, F.linear(x3, self.pq_A), p_mix)  # (x·Aᵀ)·P_β + Q_β
        return F.linear(latent, self.pq_B)

    def low_rank_update(self, beta: float) -> LowRankUpdate:
        """down = P_βᵀ·A (r × d_in), up = s·B, bias = s·B·Q_β."""
        with torch.no_grad():
            p = (1.0 - beta) * self.pq_P["local"] + beta * self.pq_P["global"]
            q = (1.0 - beta) * self.pq_Q["local"] + beta * self.pq_Q["global"]
            return LowRankUpdate(p.T @ self.pq_A, self.scaling * self.pq_B, self.scaling * (self.pq_B @ q))

    def global_is_zero(self) -> bool:
        return not bool(self.pq_P["global"].any()) and not bool(self.pq_Q["global"].any())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class DualLoRALinear(_GatedDualAdapter):
    """Plain dual LoRA: ``s · (dropout(x)·A_bᵀ)·B_bᵀ`` for branch b ∈ {local, global}.

    Both branches start from the same seeded Kaiming-uniform A and B = 0 (output exactly 0);
    the local A/B are trainable, the global ones frozen. The gate mixes them as in PQ layers:
    ``ΔW = s·((1−β)·B_local·A_local + β·B_global·A_global)``, no bias.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        context: GateContext,
        *,
        r: int,
        alpha: float,
        generator: torch.Generator | None = None,
        dropout: float = 0.0,
        gate_noise: bool = True,
    ) -> None:
        super().__init__(base_layer, context, dropout=dropout, gate_noise=gate_noise)
        self.r = int(r)
        self.scaling = float(alpha) / self.r
        device = self.device
        # Kaiming-uniform with a = √5 (as nn.Linear / peft): U(−1/√d_in, 1/√d_in).
        bound = 1.0 / math.sqrt(self.in_features)
        init_a = (torch.rand(r, self.in_features, generator=generator) * 2.0 - 1.0) * bound
        self.lora_A = _branch_dict(lambda: init_a.to(device, ADAPTER_DTYPE).clone())
        self.lora_B = _branch_dict(
            lambda: torch.zeros(self.out_features, r, device=device, dtype=ADAPTER_DTYPE)
        )

    def mixed_delta(self, x3: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        a_both = torch.cat([self.lora_A["local"], self.lora_A["global"]], dim=0)  # 2r × d_in
        b_both = torch.cat([self.lora_B["local"], self.lora_B["global"]], dim=1)  # d_out × 2r
        b3 = beta.to(ADAPTER_DTYPE).view(-1, 1, 1)
        coef = torch.cat([(1.0 - b3) * s, b3 * s], dim=-1).repeat_interleave(self.r, dim=-1)
        return F.linear(F.linear(x3, a_both) * coef, b_both)

    def low_rank_update(self, beta: float) -> LowRankUpdate:
        """Both branches stacked: down = [A_local; A_global], up = s·[(1−β)·B_local, β·B_global]
        (rank 2·lora_r); a global branch that is off (β = 0) or zero is left out (rank lora_r)."""
        with torch.no_grad():
            downs, ups = [self.lora_A["local"]], [(1.0 - beta) * self.scaling * self.lora_B["local"]]
            if beta != 0.0 and not self.global_is_zero():
                downs.append(self.lora_A["global"])
                ups.append(beta * self.scaling * self.lora_B["global"])
            return LowRankUpdate(torch.cat(downs, dim=0), torch.cat(ups, dim=1), None)

    def global_is_zero(self) -> bool:
        return not bool(self.lora_B["global"].any()) or not bool(self.lora_A["global"].any())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_r={self.r}, scaling={self.scaling:g}"
