"""Architecture fingerprint: which clients may share plain-LoRA A/B (docs/method.md, "PQ-LoRA").

Two models have the same fingerprint exactly when every plain-LoRA factor has the same shape in
both and the layers line up: same family, hidden size, layer count, MLP width, attention
projection widths (``q``: heads·head_dim, ``kv``: kv_heads·head_dim) and adapter rank ``r``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from fedmosaic_core.modeling import decoder_parts

_ID_FAMILY = re.compile(r"^(.+?)-d\d+-L\d+-")  # the start of ArchitectureFingerprint.id


@dataclass(frozen=True)
class ArchitectureFingerprint:
    """Shape-defining facts of a decoder's language model (+ the adapter rank when known)."""

    family: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_dim: int
    kv_dim: int
    r: int | None = None

    def __post_init__(self) -> None:
        if not self.family or not self.family.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"family must be a plain name, got {self.family!r}")
        for name in ("hidden_size", "num_layers", "intermediate_size", "q_dim", "kv_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.r is not None and (not isinstance(self.r, int) or self.r <= 0):
            raise ValueError(f"r must be a positive int or None, got {self.r!r}")

    @property
    def id(self) -> str:
        """Stable, readable id, e.g. ``llama-d64-L4-ff176-q64-kv32-r16``."""
        rank = f"r{self.r}" if self.r is not None else "r-"
        return (
            f"{self.family}-d{self.hidden_size}-L{self.num_layers}-ff{self.intermediate_size}"
            f"-q{self.q_dim}-kv{self.kv_dim}-{rank}"
        )

    @staticmethod
    def family_of(arch_id: str) -> str:
        """The family part of an :attr:`id` (``llama-d64-L4-...`` → ``llama``); an id of another
        form is its own family."""
        match = _ID_FAMILY.match(arch_id)
        return match.group(1) if match else arch_id

    @property
    def digest(self) -> str:
        """Short sha256 of the canonical JSON (for file names)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def with_rank(self, r: int) -> ArchitectureFingerprint:
        return replace(self, r=r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureFingerprint:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fingerprint fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def of(cls, model: nn.Module, r: int | None = None) -> ArchitectureFingerprint:
        """Fingerprint of a HF causal LM or LLaVA-style model (its language model)."""
        config = decoder_parts(model).config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            family=str(config.model_type),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            intermediate_size=int(config.intermediate_size),
            q_dim=int(heads * head_dim),
            kv_dim=int(kv_heads * head_dim),
            r=r,
        )
