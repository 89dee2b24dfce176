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


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def bases_file(config: FederationConfig, model_id: str) -> Path:
    """Where the aligned A/B of ``model_id`` for this seed and r are cached."""
    return default_home() / "bases" / f"seed{config.seed}-r{config.r}" / f"{_safe(model_id)}.safetensors"


def prepare_federation(config: FederationConfig) -> Path:
    """Build DRAKE-mini if needed, prepare every model of the scenario, align A/B; returns data root."""
    data_root = resolve_data_root(config)
    if not config.data_root:
        from drake_data.mini.builder import build_drake_mini

        build_drake_mini(data_root, seed=config.seed)
    scenario = load_run_scenario(config, data_root)
    model_ids = sorted({c.model_id for c in scenario.clients})
    from fedmosaic_core.models.loading import load_model

    for model_id in model_ids:
        load_model(model_id, quantization="none", seed=config.seed, public_data_root=data_root,
                   random_init=not config.pretrained)
    if config.align_bases and len(model_ids) > 1:
        align_federation_bases(config, data_root, model_ids)
    return data_root


def align_federation_bases(config: FederationConfig, data_root: Path, model_ids: list[str]) -> None:
    """Anchor = the smallest model (seeded orthonormal A/B); every other model aligned to it."""
    from fedmosaic_core.models.alignment import write_aligned_bases

    anchor = smallest_model(model_ids)
    todo = [m for m in model_ids if not bases_file(config, m).exists()]
    if not todo:
        return
    log.info("aligning A/B of %s to anchor %s (r=%d)", todo, anchor, config.r)
    write_aligned_bases(
        anchor=anchor,
        others=[m for m in model_ids if m != anchor],
        out_files={m: bases_file(config, m) for m in model_ids},
        r=config.r,
        alpha=config.alpha,
        seed=config.seed,
        public_data_root=data_root,
    )
    missing = [m for m in model_ids if not bases_file(config, m).exists()]
    if missing:
        raise RuntimeError(f"A/B alignment did not write bases for {missing}")
