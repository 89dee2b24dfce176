"""Configuration of a PQ-LoRA adapter (docs/method.md, "PQ-LoRA"), validated when it is built."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class PQLoRAConfig:
    """Hyper-parameters of PQ-LoRA.

    ``r``: rank of the PQ layers (P is r×r, Q has r entries; every client must use the same r).
    ``alpha``: scale numerator, the adapter output is multiplied by ``s = alpha / r``
    (plain LoRA layers use ``alpha / lora_r``).
    ``dropout``: dropout probability on the adapter input.
    ``target_modules``: names (or dotted suffixes) of the linear layers inside each decoder layer.
    ``num_blocks``: the decoder is cut into this many equal blocks; the last layer of each block
    is a PQ layer (see :func:`pq_layer_indices`).
    ``lora_r``: rank of the plain dual LoRA on the other layers (default ``r``).
    ``seed``: seed of the orthonormal A/B of PQ layers and of the Kaiming A of LoRA layers.
    ``gate_noise``: add Gaussian noise to the gate logit in training mode.
    """

    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)
    num_blocks: int = 4
    lora_r: int | None = None
    seed: int = 0
    gate_noise: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"PQLoRAConfig.r must be a positive integer, got {self.r!r}")
        if self.lora_r is None:
            self.lora_r = self.r
        if not _is_int(self.lora_r) or self.lora_r <= 0:
            raise ValueError(
                f"PQLoRAConfig.lora_r must be a positive integer, got {self.lora_r!r}"
            )
        if not _is_number(self.alpha) or not (0 < float(self.alpha) < float("inf")):
            raise ValueError(
                f"PQLoRAConfig.alpha must be a finite positive number, got {self.alpha!r}"
            )
        self.alpha = float(self.alpha)
        if not _is_number(self.dropout) or not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"PQLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if isinstance(self.target_modules, str) or not all(
            isinstance(name, str) for name in self.target_modules
        ):
            raise ValueError(
                "PQLoRAConfig.target_modules must be a sequence of module names, "
                f"got {self.target_modules!r}"
            )
        targets = tuple(self.target_modules)
        if not targets or any(not name or name.strip() != name for name in targets):
            raise ValueError(
                f"PQLoRAConfig.target_modules must hold non-empty names, got {targets!r}"
            )
        if len(set(targets)) != len(targets):
            raise ValueError(f"PQLoRAConfig.target_modules has duplicates: {targets!r}")
        self.target_modules = targets
        if not _is_int(self.num_blocks) or self.num_blocks <= 0:
            raise ValueError(
                f"PQLoRAConfig.num_blocks must be a positive integer, got {self.num_blocks!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"PQLoRAConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.gate_noise, bool):
            raise ValueError(f"PQLoRAConfig.gate_noise must be a bool, got {self.gate_noise!r}")

    @property
    def scaling(self) -> float:
        """``s = alpha / r`` of the PQ layers."""
        return self.alpha / self.r

    @property
    def lora_scaling(self) -> float:
        """``alpha / lora_r`` of the plain LoRA layers."""
        assert self.lora_r is not None
        return self.alpha / self.lora_r

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PQLoRAConfig:
        if not isinstance(data, Mapping):
            raise ValueError(f"PQLoRAConfig.from_dict expects a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PQLoRAConfig: unknown field(s) {unknown}")
        values = dict(data)
        if "target_modules" in values and isinstance(values["target_modules"], list):
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PQLoRAConfig:
        return cls.from_dict(json.loads(text))
