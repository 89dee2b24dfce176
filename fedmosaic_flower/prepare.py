"""First-time preparation of a run: benchmark data, tiny foundation models, aligned A/B.

Everything is cached under ``$FEDMOSAIC_CACHE`` (default ``~/.cache/fedmosaic``), keyed by what
determines it, built atomically and reused on later runs; paths are absolute because the Flower
apps run from a copy of the code under ``$FLWR_HOME``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from drake_data.layout import Scenario, load_scenario, resolve_image_path
from drake_data.mini import build_drake_mini, load_public
from drake_data.prompts import render_sample
from fedmosaic_core.models.align import (
    FORMAT_VERSION,
    AlignConfig,
    align_bases,
    alignment_summary,
    anchor_aligned_bases,
    save_aligned_bases,
)
from fedmosaic_core.models.collate import SampleLike
from fedmosaic_core.models.loading import LoadedModel, load_model
from fedmosaic_core.models.presets import PRESETS
from fedmosaic_core.models.pretrain import prepare_presets
from fedmosaic_core.storage import cache_home, file_lock
from fedmosaic_flower.config import FederationConfig

log = logging.getLogger("fedmosaic.prepare")


class DrakePublicSplit:
    """DRAKE-mini's public split under ``root`` (:class:`fedmosaic_core.models.pretrain.PublicSplit`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def digest(self) -> str:
        """sha256 over the records (canonical JSON) and the bytes of every image they reference
        (computed once per folder and manifest time in a process)."""
        manifest = self.root / "manifest.json"
        return _digest_of(self.root.resolve(), manifest.stat().st_mtime if manifest.exists() else 0.0)

    def samples(self) -> list[SampleLike]:
        items = list(load_public(self.root))
        if not items:
            raise ValueError(f"the public split under {self.root} is empty")
        return [render_sample(record, self.root) for record in items]


@functools.lru_cache(maxsize=8)
def _digest_of(root: Path, stamp: float) -> str:
    digest = hashlib.sha256()
    for record in load_public(root):
        digest.update(json.dumps(record, sort_keys=True).encode("utf-8"))
        images = record.get("image") or []
        for image in [images] if isinstance(images, str) else images:
            found = resolve_image_path(root, image)
            if found is None:
                raise FileNotFoundError(f"public split image {image!r} not found under {root}")
            digest.update(found.read_bytes())
        digest.update(b"\1")
    return digest.hexdigest()


def public_digest(data_root: Path) -> str:
    """The public split's digest (cached per folder and manifest time); "none" without a split."""
    if not (data_root / "public").is_dir():
        return "none"
    return DrakePublicSplit(data_root).digest()


def cached_drake_mini(seed: int, cache_dir: Path | None = None) -> Path:
    """DRAKE-mini for ``seed`` under ``<cache>/drake-mini-seed<seed>``, built once (a cached build of
    an older version is rebuilt: the cache is derived data)."""
    cache = cache_dir or cache_home()
    root = cache / f"drake-mini-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".drake-mini-seed{seed}.lock"):
        build_drake_mini(root, seed, force=True)  # skipped when a current build is there
    return root


def default_public_data_root(seed: int, cache_dir: Path | None = None) -> Path:
    """``$FEDMOSAIC_PUBLIC_DATA`` or the cached DRAKE-mini of ``seed``."""
    env = os.environ.get("FEDMOSAIC_PUBLIC_DATA")
    return Path(env).expanduser() if env else cached_drake_mini(seed, cache_dir)


def resolve_data_root(config: FederationConfig) -> Path:
    """``data-root`` or DRAKE-mini for this seed under the cache."""
    if config.data_root:
        return Path(config.data_root).expanduser()
    return cache_home() / f"drake-mini-seed{config.seed}"


def scenario_path(config: FederationConfig, data_root: Path) -> Path:
    """An absolute scenario path, or a name (``two-families`` → ``<data>/scenario-two-families.json``)."""
    if Path(config.scenario).is_absolute():
        return Path(config.scenario)
    name = config.scenario.removesuffix(".json").removeprefix("scenario-")
    return data_root / f"scenario-{name}.json"


def load_run_scenario(config: FederationConfig, data_root: Path) -> Scenario:
    return load_scenario(scenario_path(config, data_root), data_root)


@functools.lru_cache(maxsize=64)
def model_size(model_id: str) -> float:
    """Parameter count of a preset or an estimate for another model (to find the smallest);
    computed once per model id in a process (every client round asks for the probe model)."""
    from fedmosaic_core.models.presets import PRESETS, preset_config

    if model_id in PRESETS:
        from transformers import LlavaForConditionalGeneration

        with torch.device("meta"):
            model = LlavaForConditionalGeneration(preset_config(model_id))
        return float(sum(p.numel() for p in model.parameters()))
    from transformers import AutoConfig

    from fedmosaic_core.models.gguf import converted_checkpoint, is_gguf_source

    cfg = AutoConfig.from_pretrained(str(converted_checkpoint(model_id)) if is_gguf_source(model_id) else model_id)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * hidden)
    embeddings = text.vocab_size * hidden * (1 if getattr(text, "tie_word_embeddings", False) else 2)
    return float(layers * (4 * hidden * hidden + 3 * hidden * inter) + embeddings)


def smallest_model(model_ids: list[str]) -> str:
    unique = sorted(set(model_ids))
    return min(unique, key=lambda m: (model_size(m), m))


def probe_model_id(config: FederationConfig, scenario: Scenario) -> str:
    """``probe-model`` or the smallest model of the federation (docs/method.md, "RELA")."""
    return config.probe_model or smallest_model([c.model_id for c in scenario.clients])


def bases_dir(config: FederationConfig, anchor: str, data_root: Path) -> Path:
    """Where the aligned A/B (one file per architecture, named by its fingerprint) are cached:
    keyed by the public split too, since the presets they align are pretrained on it."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in anchor)
    version = f"v{FORMAT_VERSION}-seed{config.seed}-r{config.r}-data{public_digest(data_root)[:12]}"
    return cache_home() / "bases" / version / f"anchor-{safe}"


def load_run_model(
    config: FederationConfig, model_id: str, data_root: Path, quantization: str | None = None
) -> LoadedModel:
    """A model of the run: presets pretrained (once, cached) on the public split under
    ``data_root``; hub ids and paths as they are."""
    return load_model(
        model_id, quantization=quantization or config.quantization, seed=config.seed,  # type: ignore[arg-type]
        public_split=DrakePublicSplit(data_root), random_init=not config.pretrained,
    )


def prepare_federation(config: FederationConfig) -> Path:
    """Build DRAKE-mini if needed, prepare every model of the scenario, align A/B; returns data root."""
    data_root = prepare_data(config)
    prepare_models(config, data_root)
    return data_root


def prepare_data(config: FederationConfig) -> Path:
    """The run's data root, DRAKE-mini built first when the run uses the cached one."""
    if not config.data_root:
        cached_drake_mini(config.seed)
    return resolve_data_root(config)


def prepare_models(config: FederationConfig, data_root: Path) -> None:
    """Pretrain the scenario's presets (once, cached, in parallel workers) and align A/B. Safe to
    run in several processes at once: each preset and the alignment are built under a file lock,
    so a second caller waits and reuses the first one's result."""
    scenario = load_run_scenario(config, data_root)
    model_ids = sorted({c.model_id for c in scenario.clients})
    presets = [m for m in model_ids if m in PRESETS]
    if config.pretrained and presets:
        prepare_presets(DrakePublicSplit(data_root), seed=config.seed, presets=presets)  # in parallel
    loaded = {m: load_run_model(config, m, data_root, quantization="none") for m in model_ids}
    if config.align_bases and len(model_ids) > 1:
        align_federation_bases(config, data_root, loaded)


def align_federation_bases(config: FederationConfig, data_root: Path, loaded: dict) -> Path:  # type: ignore[type-arg]
    """docs/method.md, "Aligning A and B across architectures": the smallest model is the anchor (seeded orthonormal A/B); every other
    architecture's A is trained to match the anchor's latents, B mapped by CCA. Cached."""
    anchor = smallest_model(list(loaded))
    out = bases_dir(config, anchor, data_root)
    wanted = {m: loaded[m].fingerprint.with_rank(config.r).id for m in loaded}
    if all((out / f"{fp}.safetensors").is_file() for fp in wanted.values()):
        return out
    with file_lock(out.parent / f".{out.name}.lock"):  # another process may be aligning the same bases
        _align_missing(config, data_root, loaded, anchor, out, wanted)
    return out


def _align_missing(
    config: FederationConfig, data_root: Path, loaded: dict, anchor: str, out: Path, wanted: dict[str, str]  # type: ignore[type-arg]
) -> None:
    align_config = AlignConfig(r=config.r, seed=config.seed)
    todo = sorted({m for m, fp in wanted.items() if not (out / f"{fp}.safetensors").is_file()})
    if not todo:
        return
    samples = DrakePublicSplit(data_root).samples()
    done: set[str] = set()
    for model_id in [anchor, *[m for m in todo if m != anchor]]:
        fp = wanted[model_id]
        if fp in done or (out / f"{fp}.safetensors").is_file():
            continue
        if fp == wanted[anchor]:
            bases = anchor_aligned_bases(loaded[anchor], align_config)
        else:
            log.info("aligning A/B of %s to anchor %s (r=%d)", model_id, anchor, config.r)
            bases = align_bases(loaded[anchor], loaded[model_id], samples, align_config)
            log.info("aligned %s: %s", model_id, alignment_summary(bases.metrics))
        save_aligned_bases(bases, out)
        done.add(fp)
