"""PQ-LoRA: the dimension-invariant dual adapter of FedMosaic (docs/method.md, "PQ-LoRA"), in peft-tuner shape.

``config`` (:class:`PQLoRAConfig`), ``layer`` (:class:`PQLoRALinear`, :class:`DualLoRALinear`),
``model`` (:func:`inject_pqlora`, :class:`PQLoRAModel`), ``state`` (keys, checks) and
``orthonormal`` (seeded orthonormal A/B).
"""

from .config import DEFAULT_TARGET_MODULES, PQLoRAConfig
from .layer import BRANCHES, DualLoRALinear, GateContext, PQLoRALinear
from .model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdaptedModule,
    PQLoRAModel,
    gate_pooling,
    inject_pqlora,
    load_pqlora,
    pq_layer_indices,
)
from .orthonormal import orthonormal_bases
from .state import AdapterStateError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BRANCHES",
    "DEFAULT_TARGET_MODULES",
    "AdaptedModule",
    "AdapterStateError",
    "DualLoRALinear",
    "GateContext",
    "PQLoRAConfig",
    "PQLoRALinear",
    "PQLoRAModel",
    "gate_pooling",
    "inject_pqlora",
    "load_pqlora",
    "orthonormal_bases",
    "pq_layer_indices",
]
