"""Models: tiny LLaVA presets, loading (incl. 4-bit), fingerprints, collation, preparation and
cross-architecture A/B alignment (docs/method.md, "PQ-LoRA", "Aligning A and B across architectures", "Offline models")."""

from .collate import collate, collate_for_generation, generate_answers
from .fingerprint import ArchitectureFingerprint
from .loading import (
    DEFAULT_PROBE_MODEL,
    LoadedModel,
    ModelNotAvailableError,
    disable_avx512bf16_repacking,
    load_model,
)
from .presets import PRESETS, UnknownPresetError, build_preset, build_tiny_processor
from .tokenizer import load_tiny_tokenizer

__all__ = [
    "DEFAULT_PROBE_MODEL",
    "PRESETS",
    "ArchitectureFingerprint",
    "LoadedModel",
    "ModelNotAvailableError",
    "UnknownPresetError",
    "build_preset",
    "build_tiny_processor",
    "collate",
    "collate_for_generation",
    "disable_avx512bf16_repacking",
    "generate_answers",
    "load_model",
    "load_tiny_tokenizer",
]
