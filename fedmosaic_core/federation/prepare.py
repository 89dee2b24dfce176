"""First-time preparation of a run: benchmark data, tiny foundation models, aligned A/B.

Everything is cached under ``$FEDMOSAIC_CACHE`` (default ``~/.cache/fedmosaic``), keyed by what
determines it, built atomically and reused on later runs; paths are absolute because the Flower
apps run from a copy of the code under ``$FLWR_HOME``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from drake_data.layout import Scenario, load_scenario
from fedmosaic_core.federation.config import FederationConfig, default_home

log = logging.getLogger("fedmosaic.prepare")


def resolve_data_root(config: FederationConfig) -> Path:
    """``data-root`` or DRAKE-mini for this seed under the cache."""
    if config.data_root:
        return Path(config.data_root).expanduser()
    return default_home() / f"drake-mini-seed{config.seed}"


def scenario_path(config: FederationConfig, data_root: Path) -> Path:
    """An absolute scenario path, or a name (``two-families`` → ``<data>/scenario-two-families.json``)."""
    if Path(config.scenario).is_absolute():
        return Path(config.scenario)
    name = config.scenario.removesuffix(".json").removeprefix("scenario-")
    return data_root / f"scenario-{name}.json"


def load_run_scenario(config: FederationConfig, data_root: Path) -> Scenario:
    return load_scenario(scenario_path(config, data_root), data_root)


def model_size(model_id: str) -> float:
    """Parameter count of a preset or an estimate for another model (to find the smallest)."""
    from fedmosaic_core.models.presets import PRESETS, preset_config

    if model_id in PRESETS:
        from transformers import LlavaForConditionalGeneration

        with torch.device("meta"):
            model = LlavaForConditionalGeneration(preset_config(model_id))
        return float(sum(p.numel() for p in model.parameters()))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_id)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * hidden)
    return float(layers * (4 * hidden * hidden + 3 * hidden * inter))


def smallest_model(model_ids: list[str]) -> str:
    unique = sorted(set(model_ids))
    return min(unique, key=lambda m: (model_size(m), m))


def probe_model_id(config: FederationConfig, scenario: Scenario) -> str:
    """``probe-model`` or the smallest model of the federation (DESIGN §4)."""
    return config.probe_model or smallest_model([c.model_id for c in scenario.clients])


def bases_dir(config: FederationConfig, anchor: str) -> Path:
    """Where the aligned A/B (one file per architecture, named by its fingerprint) are cached."""
    from fedmosaic_core.models.align import FORMAT_VERSION

    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in anchor)
    version = f"v{FORMAT_VERSION}-seed{config.seed}-r{config.r}"
    return default_home() / "bases" / version / f"anchor-{safe}"


def prepare_federation(config: FederationConfig) -> Path:
    """Build DRAKE-mini if needed, prepare every model of the scenario, align A/B; returns data root."""
    data_root = resolve_data_root(config)
    if not config.data_root:
        from drake_data.mini.builder import build_drake_mini

        build_drake_mini(data_root, seed=config.seed)
    scenario = load_run_scenario(config, data_root)
    model_ids = sorted({c.model_id for c in scenario.clients})
    from fedmosaic_core.models.loading import load_model

    loaded = {
        m: load_model(m, quantization="none", seed=config.seed, public_data_root=data_root,
                      random_init=not config.pretrained)
        for m in model_ids
    }
    if config.align_bases and len(model_ids) > 1:
        align_federation_bases(config, data_root, loaded)
    return data_root


def align_federation_bases(config: FederationConfig, data_root: Path, loaded: dict) -> Path:  # type: ignore[type-arg]
    """DESIGN §3: the smallest model is the anchor (seeded orthonormal A/B); every other
    architecture's A is trained to match the anchor's latents, B mapped by CCA. Cached."""
    from fedmosaic_core.models.align import (
        AlignConfig,
        align_bases,
        anchor_aligned_bases,
        save_aligned_bases,
    )
    from fedmosaic_core.models.prepare import load_public_samples

    anchor = smallest_model(list(loaded))
    out = bases_dir(config, anchor)
    align_config = AlignConfig(r=config.r, seed=config.seed)
    wanted = {m: loaded[m].fingerprint.with_rank(config.r).id for m in loaded}
    todo = sorted({m for m, fp in wanted.items() if not (out / f"{fp}.safetensors").is_file()})
    if not todo:
        return out
    samples = load_public_samples(data_root)
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
            log.info("alignment %s: %s", model_id, {k: v for k, v in bases.metrics.items() if not isinstance(v, dict)})
        save_aligned_bases(bases, out)
        done.add(fp)
    return out
