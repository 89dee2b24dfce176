"""Injection of PQ-LoRA into a Hugging Face decoder and the wrapper that owns its state."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedmosaic_core.modeling import IGNORE_INDEX, decoder_parts
from fedmosaic_core.storage import atomic_write_with

from .config import PQLoRAConfig
from .layer import (
    BRANCHES,
    DualLoRALinear,
    GateContext,
    LowRankUpdate,
    PQLoRALinear,
    _GatedDualAdapter,
    base_kind,
)
from .orthonormal import orthonormal_bases, seeded_generator
from .state import (
    AdapterStateError,
    Spec,
    gate_key,
    lora_key,
    raise_if_problems,
    shared_key,
    state_problems,
)

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "fedmosaic-pqlora"
ADAPTER_FORMAT_VERSION = 1
# Config fields that change the function an adapter file computes: they must match on load.
_MUST_MATCH = ("r", "alpha", "lora_r", "target_modules", "num_blocks")


def prompt_mask(attention_mask: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens a gate pools over (batch × tokens, 1 = pooled): real tokens that are not answer
    tokens, i.e. ``attention_mask`` (all ones if absent) where ``labels`` is ``IGNORE_INDEX``
    (everywhere if there are no labels). ``None`` when neither is given."""
    if labels is None:
        return attention_mask
    prompt = (labels == IGNORE_INDEX).long()
    if attention_mask is None:
        return prompt
    if attention_mask.shape != labels.shape:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} and labels of shape "
            f"{tuple(labels.shape)} differ"
        )
    return attention_mask.long() * prompt


def gate_pooling(
    model: nn.Module, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None
) -> AbstractContextManager[None]:
    """:meth:`PQLoRAModel.gate_pooling` for a PQ-LoRA model; a no-op block for any other model."""
    if isinstance(model, PQLoRAModel):
        return model.gate_pooling(attention_mask, labels)
    return nullcontext()


#: projections of a decoder layer whose bias one config switch turns on (Llama, Mistral, …)
BIAS_SWITCHES = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _declare_merged_biases(model: nn.Module) -> None:
    """After a merge: turn on the config's bias switch of every projection group where a merge
    added a bias, giving the group's other projections zero biases, so the checkpoint describes
    itself; log the biases no switch covers (a reload from the config would drop them)."""
    layers: Any = decoder_parts(model).layers
    config: Any = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for switch, names in BIAS_SWITCHES.items():
        if not hasattr(text_config, switch) or getattr(text_config, switch):
            continue
        if give_zero_biases(layers, names):
            setattr(text_config, switch, True)
    lost = undescribed_biases(model)
    if lost:
        projections = sorted({name.split(".", 1)[1] for name in lost})
        logger.warning("merge_and_unload: the merged biases of %d projection(s) (%s) are not described by "
                       "the model's config; a reload from the config would drop them. Keep the unmerged "
                       "adapter for this architecture", len(lost), ", ".join(projections))


def give_zero_biases(layers: Any, names: tuple[str, ...]) -> bool:
    """If any linear named in ``names`` (last name part) in ``layers`` has a bias, give every
    other one of them a zero bias; returns whether any had one."""
    linears = [m for layer in layers for n, m in layer.named_modules()
               if n.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear)]
    if not any(m.bias is not None for m in linears):
        return False
    for module in linears:
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                   device=module.weight.device), requires_grad=False)
    return True


def undescribed_biases(model: nn.Module, text_config: Any = None) -> list[str]:
    """``"{layer}.{module}"`` of the decoder linears with a bias that a model built from
    ``text_config`` (default: the model's own) would not have, so a reload would drop it."""
    layers: Any = decoder_parts(model).layers
    if text_config is None:
        config: Any = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        expected = {n for n, m in _one_layer_of(text_config).named_modules()
                    if isinstance(m, nn.Linear) and m.bias is not None}
    except Exception:  # noqa: BLE001 - an architecture we cannot rebuild: nothing to compare
        return []
    return [f"{i}.{n}" for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if isinstance(m, nn.Linear) and m.bias is not None and n not in expected]


def _one_layer_of(text_config: Any) -> nn.Module:
    """The first decoder layer of a one-layer model built from ``text_config`` (meta device)."""
    from transformers import AutoModelForCausalLM

    raw = {**text_config.to_dict(), "num_hidden_layers": 1}
    if isinstance(raw.get("layer_types"), list):
        raw["layer_types"] = raw["layer_types"][:1]
    with torch.device("meta"):
        return decoder_parts(AutoModelForCausalLM.from_config(type(text_config)(**raw))).layers[0]


def _quantised_kind(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or 8-bit linear."""
    try:
        return base_kind(module) != "linear"
    except TypeError:
        return False


def select_decoding_rows(model: nn.Module, indices: torch.Tensor) -> None:
    """:meth:`PQLoRAModel.select_decoding_rows` for a PQ-LoRA model; nothing for any other model."""
    if isinstance(model, PQLoRAModel):
        model.select_decoding_rows(indices)


def branch_logit_sum(model: nn.Module, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``forward()``'s logits, or, when the model's ``logit_sum_betas`` are set (FedSim), the sum
    ``Σ_b forward()`` with every gate fixed at β = b in turn."""
    betas = getattr(model, "logit_sum_betas", None)
    if not betas:
        return forward()
    wrapper: Any = model
    previous = wrapper.fixed_beta
    total: torch.Tensor | None = None
    try:
        for beta in betas:
            wrapper.set_fixed_beta(beta)
            logits = forward()
            total = logits if total is None else total + logits
    finally:
        wrapper.set_fixed_beta(previous)
    assert total is not None
    return total


def pq_layer_indices(num_layers: int, num_blocks: int = 4) -> list[int]:
    """Indices of the PQ layers: the last layer of each of ``num_blocks`` equal blocks.

    ``[L//n − 1, 2·(L//n) − 1, …, (n−1)·(L//n) − 1, L − 1]`` for L layers and n blocks
    (16 layers → [3, 7, 11, 15]; 28 → [6, 13, 20, 27]). ``ValueError`` when L < n.
    """
    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_layers < num_blocks:
        raise ValueError(
            f"num_layers={num_layers} is smaller than num_blocks={num_blocks}: "
            "every block needs at least one decoder layer"
        )
    size = num_layers // num_blocks
    return [size * (k + 1) - 1 for k in range(num_blocks - 1)] + [num_layers - 1]


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted linear: decoder layer index, target name, PQ block position (None for plain
    LoRA), qualified path inside the top-level model, and the adapter layer itself."""

    layer: int
    module: str
    block: int | None
    path: str
    adapter: _GatedDualAdapter


def _find_target(layer: nn.Module, target: str, layer_index: int, prefix: str) -> tuple[str, Any]:
    named = [(n, m) for n, m in layer.named_modules() if n]
    matches = [(n, m) for n, m in named if n == target or n.endswith("." + target)]
    if not matches:
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target module {target!r} matches nothing in decoder layer {layer_index} "
            f"({prefix}.{layer_index}); its linear layers are {linears}"
        )
    if len(matches) > 1:
        raise ValueError(
            f"target module {target!r} is ambiguous in decoder layer {layer_index}: "
            f"{[n for n, _ in matches]}"
        )
    name, module = matches[0]
    try:
        base_kind(module)
    except TypeError as err:
        raise ValueError(f"{prefix}.{layer_index}.{name}: {err}") from None
    return name, module


def inject_pqlora(model: nn.Module, config: PQLoRAConfig) -> PQLoRAModel:
    """Wrap every target linear of the language model's decoder layers with PQ-LoRA.

    PQ layers (:func:`pq_layer_indices`) get :class:`PQLoRALinear` with seeded orthonormal A/B
    (from ``config.seed``, block position and target name); all other decoder layers get
    :class:`DualLoRALinear`. The vision tower, projector and lm_head are untouched; every base
    parameter is frozen. Everything is checked before the model is modified (``ValueError``).
    """
    if not isinstance(config, PQLoRAConfig):
        raise TypeError(f"config must be a PQLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, _GatedDualAdapter) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already carries PQ-LoRA adapters")
    parts = decoder_parts(model)
    num_layers = len(parts.layers)
    pq_indices = pq_layer_indices(num_layers, config.num_blocks)
    block_of = {layer: k for k, layer in enumerate(pq_indices)}

    plan: list[tuple[int, str, str, Any]] = []
    for li, layer in enumerate(parts.layers):
        seen: dict[int, str] = {}
        for target in config.target_modules:
            name, module = _find_target(layer, target, li, parts.layers_prefix)
            if id(module) in seen:
                raise ValueError(
                    f"targets {seen[id(module)]!r} and {target!r} select the same module "
                    f"{parts.layers_prefix}.{li}.{name}"
                )
            seen[id(module)] = target
            if li in block_of:
                d_in, d_out = int(module.in_features), int(module.out_features)
                if config.r > min(d_in, d_out):
                    raise ValueError(
                        f"r={config.r} is larger than module {target!r} of decoder layer {li} "
                        f"allows (d_in={d_in}, d_out={d_out}): orthonormal A needs r ≤ d_in "
                        "and B needs r ≤ d_out"
                    )
            plan.append((li, target, name, module))

    model.requires_grad_(False)
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:  # docs/method.md, "Offline models", for every 4-bit layer (adapted or not)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False

    context = GateContext()
    adapted: list[AdaptedModule] = []
    for li, target, name, module in plan:
        block = block_of.get(li)
        adapter: _GatedDualAdapter
        if block is not None:
            a, b = orthonormal_bases(
                int(module.in_features), int(module.out_features), config.r, config.seed, block, target
            )
            adapter = PQLoRALinear(
                module, context, r=config.r, alpha=config.alpha, A=a, B=b,
                dropout=config.dropout, gate_noise=config.gate_noise,
            )
        else:
            assert config.lora_r is not None
            adapter = DualLoRALinear(
                module, context, r=config.lora_r, alpha=config.alpha,
                generator=seeded_generator(config.seed, "lora", li, target),
                dropout=config.dropout, gate_noise=config.gate_noise,
            )
        adapter.train(module.training)  # keep the replaced module's train/eval mode
        path = f"{parts.layers_prefix}.{li}.{name}"
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, adapter)
        adapted.append(AdaptedModule(li, target, block, path, adapter))
    return PQLoRAModel(model, config, context, adapted, pq_indices, num_layers)


def load_pqlora(model: nn.Module, directory: str | os.PathLike[str]) -> PQLoRAModel:
    """Inject PQ-LoRA with the configuration saved in ``directory`` and load its weights."""
    config, _ = _read_adapter_config(Path(directory))
    wrapped = inject_pqlora(model, config)
    wrapped.load_adapter(directory)
    return wrapped


def _read_adapter_config(directory: Path) -> tuple[PQLoRAConfig, dict[str, Any]]:
    path = directory / ADAPTER_CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterStateError(f"cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise AdapterStateError(f"{path} is not a {ADAPTER_FORMAT} adapter config")
    if meta.get("version") != ADAPTER_FORMAT_VERSION:
        raise AdapterStateError(
            f"{path}: unsupported format version {meta.get('version')!r} "
            f"(expected {ADAPTER_FORMAT_VERSION})"
        )
    try:
        config = PQLoRAConfig.from_dict(meta.get("config", {}))
    except (TypeError, ValueError) as err:
        raise AdapterStateError(f"{path}: {err}") from None
    return config, meta


class PQLoRAModel(nn.Module):
    """A Hugging Face model with PQ-LoRA injected (see :func:`inject_pqlora`).

    ``forward(**batch)`` and ``generate(...)`` delegate to the wrapped model; a forward pre-hook
    on it hands the call's prompt mask (:func:`prompt_mask`) to every gate, so that neither
    padding nor answer tokens count in the gate's mean. Other attributes are looked up on the
    wrapped model.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PQLoRAConfig,
        context: GateContext,
        adapted: list[AdaptedModule],
        pq_indices: list[int],
        num_layers: int,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.pqlora_config = config
        self.pq_layer_indices = list(pq_indices)
        self.num_layers = num_layers
        self._context = context
        self._adapted = list(adapted)
        self._merged = False
        self._mask_position = self._attention_mask_position(model)
        self._mask_hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        self.training = model.training
        #: when set, the output is the *sum of the logits* of one forward per β (FedSim's
        #: global-alone + local-alone); the scoring and generation helpers honour it
        self.logit_sum_betas: tuple[float, ...] | None = None

    # -- delegation ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @staticmethod
    def _attention_mask_position(model: nn.Module) -> int | None:
        try:
            names = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            return None
        return names.index("attention_mask") if "attention_mask" in names else None

    def _capture_mask(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._context.pinned:
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        labels = kwargs.get("labels")
        self._context.prompt_mask = prompt_mask(
            mask if isinstance(mask, torch.Tensor) else None, labels if isinstance(labels, torch.Tensor) else None
        )

    @contextmanager
    def gate_pooling(self, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None) -> Iterator[None]:
        """Inside the block every gate pools over :func:`prompt_mask` of these, for calls that
        bypass this wrapper's forward (e.g. the decoder alone). The mask stays set afterwards, as
        after a forward, for activation checkpointing's recomputation."""
        self._context.prompt_mask = prompt_mask(attention_mask, labels)
        self._context.pinned = True
        try:
            yield
        finally:
            self._context.pinned = False

    def select_decoding_rows(self, indices: torch.Tensor) -> None:
        """After a prompt forward, make row k of the next incremental forward use the gates' β of
        prompt ``indices[k]`` (as ``Cache.batch_select_indices`` does for keys and values)."""
        for item in self._adapted:
            item.adapter.select_decoding_rows(indices)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_not_merged()
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._check_not_merged()
        return self.base_model.generate(*args, **kwargs)  # type: ignore[operator]

    def _check_not_merged(self) -> None:
        if self._merged:
            raise RuntimeError("this PQLoRAModel was merged and unloaded; use the returned model")

    # -- structure -------------------------------------------------------------------------
    @property
    def adapted_modules(self) -> list[AdaptedModule]:
        return list(self._adapted)

    def _pq(self) -> Iterator[tuple[int, str, PQLoRALinear]]:
        for item in self._adapted:
            if item.block is not None:
                assert isinstance(item.adapter, PQLoRALinear)
                yield item.block, item.module, item.adapter

    def _lora(self) -> Iterator[tuple[int, str, DualLoRALinear]]:
        for item in self._adapted:
            if item.block is None:
                assert isinstance(item.adapter, DualLoRALinear)
                yield item.layer, item.module, item.adapter

    def set_fixed_beta(self, beta: float | None) -> None:
        """Fix every gate to β (``None``: back to the learned, input-dependent gate)."""
        if beta is not None and not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"fixed beta must be a number in [0, 1] or None, got {beta!r}")
        self._context.fixed_beta = None if beta is None else float(beta)

    @property
    def fixed_beta(self) -> float | None:
        return self._context.fixed_beta

    def set_logit_sum(self, betas: tuple[float, ...] | None) -> None:
        """Make the model's output ``Σ_b logits(β = b)`` (e.g. ``(1.0, 0.0)``: global branch alone
        plus local branch alone, as FedSim); ``None``: one forward with the gates as they are."""
        if betas is not None:
            betas = tuple(float(b) for b in betas)
            if len(betas) < 2 or not all(0.0 <= b <= 1.0 for b in betas):
                raise ValueError(f"logit-sum betas must be two or more values in [0, 1], got {betas!r}")
        self.logit_sum_betas = betas

    def enable_activation_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in backward instead of keeping them
        (transformers' non-reentrant activation checkpointing; frozen bases need no input grads).
        The gates recompute the same β: the prompt mask outlives the forward and the RNG state of
        the gate noise is restored for the recomputation."""
        if not getattr(self.base_model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"gradient-checkpointing: {type(self.base_model).__name__} does not support "
                "activation checkpointing; set gradient-checkpointing = false"
            )
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers ≥ 5.2x; gradient_checkpointing_enable is deprecated there
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.base_model.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether any module of the base model recomputes its activations in backward."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules())

    def set_global_trainable(self, trainable: bool) -> None:
        """Let the optimiser train the global branch too (methods that train the global adapter
        on the client, e.g. Ditto, FedSim, FedDPA); by default it is frozen."""
        self._check_not_merged()
        for parameter in self.branch_parameters("global").values():
            parameter.requires_grad_(trainable)

    # -- parameter tables (key → live parameter) -------------------------------------------
    def _shared_params(self, branch: str) -> dict[str, nn.Parameter]:
        table: dict[str, nn.Parameter] = {}
        for block, module, layer in self._pq():
            table[shared_key(block, module, "P")] = layer.pq_P[branch]
            table[shared_key(block, module, "Q")] = layer.pq_Q[branch]
        return table

    def _same_arch_params(self, branch: str) -> dict[str, nn.Parameter]:
        table: dict[str, nn.Parameter] = {}
        for li, module, layer in self._lora():
            table[lora_key(li, module, "A")] = layer.lora_A[branch]
            table[lora_key(li, module, "B")] = layer.lora_B[branch]
        return table

    def _gate_params(self) -> dict[str, nn.Parameter]:
        return {gate_key(i.layer, i.module): i.adapter.gate.weight for i in self._adapted}  # type: ignore[misc]

    def _base_params(self) -> dict[str, nn.Parameter]:
        table: dict[str, nn.Parameter] = {}
        for block, module, layer in self._pq():
            table[shared_key(block, module, "A")] = layer.pq_A
            table[shared_key(block, module, "B")] = layer.pq_B
        return table

    @staticmethod
    def _spec(table: Mapping[str, nn.Parameter]) -> Spec:
        return {key: tuple(p.shape) for key, p in table.items()}

    @staticmethod
    def _snapshot(table: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in table.items()}

    @staticmethod
    def _write(table: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, parameter in table.items():
                parameter.copy_(state[key].to(parameter.device, parameter.dtype))

    @staticmethod
    def _check_branch(branch: str) -> None:
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")

    # -- state views -----------------------------------------------------------------------
    def shared_state(self, branch: str = "local") -> dict[str, torch.Tensor]:
        """P/Q of the PQ layers (``pq.{k}.{module}.P|Q``), float32 CPU copies."""
        self._check_branch(branch)
        return self._snapshot(self._shared_params(branch))

    def same_arch_state(self, branch: str = "local") -> dict[str, torch.Tensor]:
        """A/B of the plain LoRA layers (``lora.{layer}.{module}.A|B``), float32 CPU copies."""
        self._check_branch(branch)
        return self._snapshot(self._same_arch_params(branch))

    def branch_parameters(self, branch: str) -> dict[str, nn.Parameter]:
        """The live P/Q and LoRA A/B parameters of one branch, by state key."""
        self._check_branch(branch)
        return {**self._shared_params(branch), **self._same_arch_params(branch)}

    def local_only_state(self) -> dict[str, torch.Tensor]:
        """Gate weights (``gate.{layer}.{module}.weight``, 1 × d_in); never sent."""
        return self._snapshot(self._gate_params())

    def pq_bases(self) -> dict[str, torch.Tensor]:
        """Frozen A/B of the PQ layers (``pq.{k}.{module}.A|B``), float32 CPU copies."""
        return self._snapshot(self._base_params())

    def load_global_state(
        self,
        shared: Mapping[str, torch.Tensor] | None = None,
        same_arch: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Fill the *global* branch. Every given state must hold exactly this model's keys with
        matching shapes and finite floating values; all are checked before anything is written
        (else one :class:`AdapterStateError` naming each bad key)."""
        self._load_states("load_global_state", "global", shared, same_arch, None)

    def load_local_state(
        self,
        shared: Mapping[str, torch.Tensor] | None = None,
        same_arch: Mapping[str, torch.Tensor] | None = None,
        local_only: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Fill the *local* branch and/or the gates, with the checks of :meth:`load_global_state`."""
        self._load_states("load_local_state", "local", shared, same_arch, local_only)

    def _load_states(
        self,
        action: str,
        branch: str,
        shared: Mapping[str, torch.Tensor] | None,
        same_arch: Mapping[str, torch.Tensor] | None,
        local_only: Mapping[str, torch.Tensor] | None,
    ) -> None:
        self._check_not_merged()
        jobs = [
            ("shared", shared, self._shared_params(branch)),
            ("same_arch", same_arch, self._same_arch_params(branch)),
            ("local_only", local_only, self._gate_params()),
        ]
        jobs = [job for job in jobs if job[1] is not None]
        if not jobs:
            raise AdapterStateError(f"{action}: no state given")
        problems: list[str] = []
        for what, state, table in jobs:
            problems += state_problems(state, self._spec(table), what)
        raise_if_problems(problems, action)
        for _, state, table in jobs:
            assert state is not None
            self._write(table, state)

    def load_pq_bases(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the frozen A/B of all PQ layers (e.g. from A/B alignment), checked first."""
        self._check_not_merged()
        table = self._base_params()
        raise_if_problems(state_problems(state, self._spec(table), "pq_bases"), "load_pq_bases")
        self._write(table, state)

    def trained_beta_by_block(self, reset: bool = True) -> dict[int, float]:
        """Mean β the gates took in training-mode forwards since the last reset, per layer block
        k = 0 … 3 (the decoder's four equal blocks, each ending in its PQ layer; plain-LoRA modules
        count in the block of their layer). Blocks whose gates saw nothing are left out."""
        per_block = max(1, self.num_layers // len(self.pq_layer_indices))
        sums: dict[int, list[float]] = {}
        for item in self._adapted:
            total, count = item.adapter.trained_beta_sum(reset)
            block = item.block if item.block is not None else min(item.layer // per_block, len(self.pq_layer_indices) - 1)
            entry = sums.setdefault(block, [0.0, 0.0])
            entry[0] += total
            entry[1] += count
        return {k: v[0] / v[1] for k, v in sorted(sums.items()) if v[1] > 0}

    def gates_without_global(self) -> list[torch.Tensor]:
        """The gates of the adapted modules whose global branch outputs exactly 0. There β only
        rescales the local branch (h = W·x + (1 − β)·L(x)), which L can do itself; a gate trained
        there learns nothing about mixing and can saturate, switching its module's local branch
        off (β → 1) before any global exists. Training leaves these gates at rest."""
        return [item.adapter.gate.weight for item in self._adapted if item.adapter.global_is_zero()]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimiser group: local P/Q, gates, local LoRA A/B and, when the
        global branch is trainable (:meth:`set_global_trainable`), global P/Q and LoRA A/B."""
        groups = {
            "pq": list(self._shared_params("local").values()),
            "gate": list(self._gate_params().values()),
            "lora": list(self._same_arch_params("local").values()),
            "pq-global": list(self._shared_params("global").values()),
            "lora-global": list(self._same_arch_params("global").values()),
        }
        return {name: [p for p in params if p.requires_grad] for name, params in groups.items()}

    # -- save / load -----------------------------------------------------------------------
    def _file_table(self) -> dict[str, nn.Parameter]:
        table: dict[str, nn.Parameter] = {}
        for branch in BRANCHES:
            for key, p in {**self._shared_params(branch), **self._same_arch_params(branch)}.items():
                table[f"{branch}.{key}"] = p
        table.update(self._gate_params())
        table.update(self._base_params())
        return table

    def save_adapter(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter_model.safetensors`` (both branches as ``local.*`` / ``global.*``, the
        gates, the PQ bases) and ``adapter_config.json``, each atomically. Returns the folder."""
        self._check_not_merged()
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: p.detach().to("cpu", torch.float32).contiguous() for k, p in self._file_table().items()}
        meta = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_FORMAT_VERSION,
            "config": self.pqlora_config.to_dict(),
            "num_layers": self.num_layers,
            "pq_layer_indices": self.pq_layer_indices,
        }
        atomic_write_with(
            folder / ADAPTER_WEIGHTS_NAME,
            lambda tmp: save_file(tensors, tmp, metadata={"format": ADAPTER_FORMAT}),
        )
        atomic_write_with(
            folder / ADAPTER_CONFIG_NAME,
            lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
        )
        return folder

    def load_adapter(self, directory: str | os.PathLike[str]) -> None:
        """Load a folder written by :meth:`save_adapter`; its config must match this model's
        (r, alpha, lora_r, target_modules, num_blocks, number of layers), all tensors are
        checked before anything is written (:class:`AdapterStateError`)."""
        self._check_not_merged()
        folder = Path(directory)
        config, meta = _read_adapter_config(folder)
        mine = self.pqlora_config
        problems = [
            f"config.{name} is {getattr(config, name)!r}, this model has {getattr(mine, name)!r}"
            for name in _MUST_MATCH
            if getattr(config, name) != getattr(mine, name)
        ]
        if meta.get("num_layers") != self.num_layers:
            problems.append(
                f"num_layers is {meta.get('num_layers')!r}, this model has {self.num_layers}"
            )
        raise_if_problems(problems, f"load_adapter({folder})")
        try:
            tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
        except Exception as err:  # safetensors raises several error types
            raise AdapterStateError(f"cannot read {folder / ADAPTER_WEIGHTS_NAME}: {err}") from None
        table = self._file_table()
        raise_if_problems(state_problems(tensors, self._spec(table), "adapter file"), f"load_adapter({folder})")
        self._write(table, tensors)

    # -- constant-β views -------------------------------------------------------------------
    def mean_betas(self, forward: Callable[[], object]) -> dict[str, float]:
        """Mean β each adapted module's gate gives the samples of the forwards ``forward()`` makes
        (eval mode: no noise), by module path; a β fixed by :meth:`set_fixed_beta` counts as it is.
        Raises ``ValueError`` if some module saw no sample."""
        self._check_not_merged()
        for item in self._adapted:
            item.adapter.observed_beta_sum(reset=True)
        self._context.observing = True
        try:
            forward()
        finally:
            self._context.observing = False
        sums = {item.path: item.adapter.observed_beta_sum(reset=True) for item in self._adapted}
        unseen = [path for path, (_, count) in sums.items() if count == 0]
        if unseen:
            raise ValueError(f"{len(unseen)} adapted module(s) saw no sample (first: {unseen[0]})")
        return {path: total / count for path, (total, count) in sums.items()}

    def _betas_by_path(self, beta: float | Mapping[str, float] | None) -> dict[str, float]:
        """One β per adapted module: a number for all, a mapping path → β (every module), or
        ``None`` for the current gates, which must then be constant (fixed, or all zero: β = ½)."""
        paths = [i.path for i in self._adapted]
        if beta is None:
            beta = self._context.fixed_beta
            if beta is None:
                varying = [i.path for i in self._adapted if bool(i.adapter.gate.weight.ne(0).any())]
                if varying:
                    raise ValueError(
                        f"{len(varying)} gate(s) are input dependent (first: {varying[0]}): a merge "
                        "is exact only for a constant β; pass beta=... (0.0 local, 1.0 global, or "
                        "one β per module, e.g. from mean_betas)"
                    )
                beta = 0.5
        if isinstance(beta, Mapping):
            missing = [p for p in paths if p not in beta]
            unknown = [p for p in beta if p not in set(paths)]
            if missing or unknown:
                raise ValueError(f"betas by module: {len(missing)} adapted module(s) missing (first: "
                                 f"{(missing or ['-'])[0]}), {len(unknown)} unknown (first: {(unknown or ['-'])[0]})")
            table = {p: beta[p] for p in paths}
        else:
            table = dict.fromkeys(paths, beta)
        bad = {p: b for p, b in table.items()
               if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= float(b) <= 1.0}
        if bad:
            path, value = next(iter(bad.items()))
            raise ValueError(f"beta must be a number in [0, 1], got {value!r} for {path}")
        return {p: float(b) for p, b in table.items()}

    def low_rank_updates(self, beta: float | Mapping[str, float] | None = None) -> dict[str, LowRankUpdate]:
        """Each adapted module's update at a constant β (as :meth:`merge_and_unload` takes it),
        factored, by module path: what a LoRA adapter file reproducing the merge holds."""
        self._check_not_merged()
        betas = self._betas_by_path(beta)
        return {i.path: i.adapter.low_rank_update(betas[i.path]) for i in self._adapted}

    # -- merge -----------------------------------------------------------------------------
    def _compute_dtype(self) -> torch.dtype:
        """The dtype the model's dense parts compute in: its input embeddings' (float32 if none)."""
        embeddings = getattr(self.base_model, "get_input_embeddings", lambda: None)()
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            return weight.dtype
        return torch.float32

    def merge_and_unload(self, beta: float | Mapping[str, float] | None = None, dequantize: bool = False) -> nn.Module:
        """Fold the adapters into dense linears and return the plain Hugging Face model.

        The merged layer is ``W + ΔW`` (plus a bias ``Δb`` from Q, added where the base had
        none) for a *constant* gate β. It equals the unmerged model exactly (up to float
        rounding) whenever the gate is input independent:

        - ``beta=None`` (default) uses the current gates, which must all be zero (β = ½) unless
          :meth:`set_fixed_beta` fixed them; any non-zero gate raises ``ValueError``;
        - ``beta=b`` merges ``(1−b)·local + b·global`` (0.0: local branch only, 1.0: global only)
          and equals the unmerged model under ``set_fixed_beta(b)``;
        - ``beta={path: b, ...}``: one constant β per adapted module (e.g. :meth:`mean_betas`).

        Quantised (4-bit / 8-bit) bases raise ``ValueError`` unless ``dequantize=True``, which
        replaces them by dense layers holding dequantised W + ΔW, stored in the dtype the model
        computes in (its input embeddings' dtype: bf16 for a CUDA NF4 model, float32 on CPU;
        the unmerged model computes with the same dequantised W, so the two agree to that dtype's
        rounding); a model that transformers loaded quantised is then dequantised whole, its
        quantization config removed, so that ``save_pretrained`` writes a dense checkpoint that
        loads again.
        Dropout and gate noise are train-time only and play no part in the merged model.
        Nothing is changed if any check fails. Q's biases are declared in the model's config
        (Llama-style ``attention_bias`` / ``mlp_bias``, the other projections of the group get
        zero biases), so that ``save_pretrained`` / ``from_pretrained`` keep them; where the config
        has no such switch (e.g. Qwen2's o_proj and MLP) a warning names the biases a reload from
        the config would drop.
        """
        self._check_not_merged()
        betas = self._betas_by_path(beta)
        quantised = [i.path for i in self._adapted if i.adapter.base_kind != "linear"]
        if quantised and not dequantize:
            raise ValueError(
                f"{len(quantised)} adapted base(s) are quantised (first: {quantised[0]}); "
                "merge_and_unload(dequantize=True) merges them into dense layers"
            )
        dense_dtype = self._compute_dtype()
        merged = [(i.path, i.adapter.merged_linear(betas[i.path], dequantize, dense_dtype)) for i in self._adapted]
        for path, linear in merged:
            parent_path, _, child = path.rpartition(".")
            setattr(self.base_model.get_submodule(parent_path), child, linear)
        _declare_merged_biases(self.base_model)
        quantizer = getattr(self.base_model, "hf_quantizer", None)
        if dequantize and quantizer is not None:
            # the rest of a model transformers loaded quantised, and its quantization config: a
            # dense checkpoint saved with a 4-bit config does not load again
            if any(_quantised_kind(m) for m in self.base_model.modules()):
                self.base_model.dequantize(dtype=dense_dtype)  # type: ignore[operator]
            else:  # transformers' dequantize fails when no quantised layer is left
                quantizer.remove_quantization_config(self.base_model)
        self._mask_hook.remove()
        self._merged = True
        return self.base_model
