"""Load a model + processor by preset name, hub id or local path (docs/method.md, "PQ-LoRA", "Offline models").

``load_model(name_or_path, quantization="none"|"nf4"|"int8", dtype=None, device=None)``

* **Presets** (``tiny-llama-s`` …) come from the prepared cache (see :mod:`.pretrain`). When a
  preset is not prepared yet it is prepared on demand (a few tens of seconds per preset on
  2 CPU cores, guarded by a file lock so concurrent clients prepare it once); pass
  ``prepare_if_missing=False`` to get an error instead, or ``random_init=True`` for the
  untrained preset (tests).
* **GGUF files** (``gguf:/path/model.gguf``, or a packaged short name such as ``smollm2-135m``)
  are converted once into a cached safetensors checkpoint (:mod:`.gguf`) and loaded from it.
* **Hub ids / local paths** go through ``from_pretrained``: LLaVA configs through
  ``LlavaForConditionalGeneration``, other vision-language configs through
  ``AutoModelForImageTextToText``, text-only ones through ``AutoModelForCausalLM``.
* **4-bit NF4** via ``BitsAndBytesConfig`` (double quantisation, compute dtype bf16 on CUDA and
  fp32 on CPU), language model only (vision tower, projector and lm_head stay in full
  precision). Every ``bnb.nn.Linear4bit`` gets ``support_avx512bf16_for_cpu = False`` (docs/method.md, "Offline models":
  otherwise an eval forward on AVX512-BF16 CPUs repacks weights and later training silently
  loses gradients).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedmosaic_core.storage import atomic_build_dir, cache_home, file_lock

from .fingerprint import ArchitectureFingerprint
from .gguf import GgufUnavailableError, converted_checkpoint, is_gguf_source
from .presets import PRESETS, build_preset, preset_spec
from .pretrain import PublicSplit, find_prepared, prepare_presets

log = logging.getLogger(__name__)

Quantization = Literal["none", "nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
# Regexes (transformers' skip-module matching): keep everything but the language model unquantised.
_SKIP_QUANTIZATION = [r".*vision_tower", r".*multi_modal_projector", r".*visual", "lm_head"]
DEFAULT_PROBE_MODEL = "tiny-llama-s"  # the smallest preset (RELA probe default)


class ModelNotAvailableError(RuntimeError):
    """A model could not be found locally and cannot be downloaded."""


@dataclass
class LoadedModel:
    """A model, its processor (``LlavaProcessor`` or a tokenizer) and its fingerprint (r unset)."""

    model: nn.Module
    processor: Any
    fingerprint: ArchitectureFingerprint
    name: str = ""
    source: str = ""  # the checkpoint folder or hub id the weights came from ("" when built here)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.processor, "image_processor")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return dtype


def quantization_config(quantization: str, device: torch.device) -> Any:
    """``BitsAndBytesConfig`` for ``nf4`` / ``int8`` (None for ``none``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            llm_int8_skip_modules=list(_SKIP_QUANTIZATION),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(_SKIP_QUANTIZATION))


def disable_avx512bf16_repacking(model: nn.Module) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every ``bnb.nn.Linear4bit``; return count."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _is_local_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _from_pretrained(
    source: str, quantization: str, dtype: torch.dtype, device: torch.device, prequantized: bool = False
) -> tuple[nn.Module, Any]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(source)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quant = None if prequantized else quantization_config(quantization, device)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if quant is not None or prequantized:
        kwargs["device_map"] = {"": str(device) if device.type == "cpu" else device.index or 0}
    model_type = getattr(config, "model_type", "")
    model: Any
    multimodal = model_type == "llava" or getattr(config, "vision_config", None) is not None
    if model_type == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    elif multimodal:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    processor = (
        AutoProcessor.from_pretrained(source) if multimodal else AutoTokenizer.from_pretrained(source)
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quant is None and not prequantized:
        model = model.to(device)
    disable_avx512bf16_repacking(model)
    return model.eval(), processor


def _prequantized_dir(folder: Path, quantization: str, dtype: torch.dtype, device: torch.device,
                      cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where the quantised copy of the checkpoint in ``folder`` is kept: keyed by the folder, its
    files' sizes and times, the quantisation, dtype and device type."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    ident = json.dumps([str(folder.resolve()), files, quantization, str(dtype), device.type])
    root = Path(cache_dir) if cache_dir is not None else cache_home()
    return root / "quantized" / hashlib.sha256(ident.encode()).hexdigest()[:32]


def _load_checkpoint(
    folder: Path, quantization: str, dtype: torch.dtype, device: torch.device,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[nn.Module, Any]:
    """A local checkpoint; quantised (NF4/int8) once and then reloaded from a saved pre-quantised
    copy. In a deployment every message starts a fresh ClientApp process that loads its model:
    quantising at load time is most of that cost (SmolLM2-135M on CPU: 18.9 s against 0.2 s
    for the pre-quantised copy, identical logits)."""
    if quantization == "none":
        return _from_pretrained(str(folder), quantization, dtype, device)
    prepared = _prequantized_dir(folder, quantization, dtype, device, cache_dir)
    if (prepared / "config.json").is_file():
        return _from_pretrained(str(prepared), quantization, dtype, device, prequantized=True)
    model, processor = _from_pretrained(str(folder), quantization, dtype, device)
    try:
        with file_lock(prepared.parent / f"{prepared.name}.lock"):
            if not (prepared / "config.json").is_file():
                def save(tmp: Path) -> None:
                    model.save_pretrained(str(tmp))  # type: ignore[operator]
                    processor.save_pretrained(str(tmp))

                atomic_build_dir(prepared, save)
    except (OSError, ValueError, NotImplementedError) as error:  # a backend that cannot serialise: load as before
        log.warning("could not keep a pre-quantised copy of %s (%s); it is quantised at every load", folder, error)
    return model, processor


def _missing_model_error(name: str, cause: BaseException | None) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    how = (
        "HF_HUB_OFFLINE is set, so nothing can be downloaded: pass a local directory holding the "
        "checkpoint (config.json + safetensors + processor/tokenizer files), or pre-fill the "
        "Hugging Face cache on a machine with network and copy it here"
        if offline
        else "check the hub id, your network and HF_TOKEN for gated models, or pass a local "
        "checkpoint directory"
    )
    presets = ", ".join(sorted(PRESETS))
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return ModelNotAvailableError(
        f"model {name!r} is not available: it is neither a preset ({presets}) nor a local "
        f"checkpoint directory, and loading it from the hub failed{detail}. {how}."
    )


def load_model(
    model_id_or_path: str | os.PathLike[str],
    quantization: Quantization = "none",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    seed: int = 0,
    random_init: bool = False,
    prepare_if_missing: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    public_split: PublicSplit | None = None,
) -> LoadedModel:
    """Load a preset, local checkpoint directory or hub id (see the module docstring)."""
    torch_device = torch.device(device) if device is not None else default_device()
    torch_dtype = _resolve_dtype(dtype, torch_device)
    quantization_config(quantization, torch_device)  # validates the name early
    name = str(model_id_or_path)

    if name in PRESETS:
        return _load_preset(
            name, quantization, torch_dtype, torch_device, seed=seed, random_init=random_init,
            prepare_if_missing=prepare_if_missing, cache_dir=cache_dir,
            public_split=public_split,
        )
    if is_gguf_source(name):
        try:
            folder = converted_checkpoint(name, cache_dir)
        except GgufUnavailableError as error:
            raise ModelNotAvailableError(str(error)) from None
        model, processor = _load_checkpoint(folder, quantization, torch_dtype, torch_device, cache_dir)
        return LoadedModel(model, processor, ArchitectureFingerprint.of(model), name, str(folder))
    if name.startswith("tiny-") and not Path(name).exists():
        preset_spec(name)  # raises UnknownPresetError naming the known presets
    path = Path(name).expanduser()
    if path.exists() and not _is_local_model_dir(path):
        raise ModelNotAvailableError(
            f"{str(path)!r} exists but is not a model directory (no config.json inside)"
        )
    source = str(path) if path.exists() else name
    try:
        if path.exists():
            model, processor = _load_checkpoint(path, quantization, torch_dtype, torch_device, cache_dir)
        else:
            model, processor = _from_pretrained(source, quantization, torch_dtype, torch_device)
    except (OSError, ValueError) as error:
        if path.exists():
            raise
        raise _missing_model_error(name, error) from error
    return LoadedModel(model, processor, ArchitectureFingerprint.of(model), name, str(path.resolve()) if path.exists() else name)


def _load_preset(
    name: str,
    quantization: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int,
    random_init: bool,
    prepare_if_missing: bool,
    cache_dir: str | os.PathLike[str] | None,
    public_split: PublicSplit | None,
) -> LoadedModel:
    model: Any
    if random_init:
        model, processor = build_preset(name, seed)
        if quantization == "none":
            model = model.to(device=device, dtype=dtype)
            return LoadedModel(model, processor, ArchitectureFingerprint.of(model), name)
        with tempfile.TemporaryDirectory(prefix="fedmosaic-preset-") as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            model, processor = _from_pretrained(tmp, quantization, dtype, device)
        return LoadedModel(model, processor, ArchitectureFingerprint.of(model), name)

    digest = public_split.digest() if public_split is not None else None
    directory = find_prepared(name, seed, cache_dir=cache_dir, data_hash=digest)
    if directory is None:
        if not prepare_if_missing or public_split is None:
            raise ModelNotAvailableError(
                f"preset {name!r} (seed {seed}) is not prepared in "
                f"{Path(cache_dir) if cache_dir else cache_home()}; run "
                f"`fedmosaic prepare-models --presets {name} --seed {seed}` "
                "(or pass random_init=True for an untrained model)"
            )
        prepared = prepare_presets(public_split, cache_dir=cache_dir, seed=seed, presets=[name])
        directory = prepared[name]
    model, processor = _from_pretrained(str(directory), quantization, dtype, device)
    return LoadedModel(model, processor, ArchitectureFingerprint.of(model), name, str(directory))
