"""A client's personal model from a finished run, as files users can serve (``fedmosaic export``).

The client's adapter of its last completed round is loaded onto its base model, and the gate's
input-dependent β is replaced by a constant per module: the mean β the gate gives the client's
own training samples (a method that evaluates at a fixed β, e.g. Ditto's local branch, keeps it).
At a constant β every adapted linear is ``W + ΔW`` plus a bias from Q, so the model merges into
a standard checkpoint. Written, into one folder built whole and then renamed into place:

``model/``         the merged model and its processor (``from_pretrained``), float32 dense;
``peft-adapter/``  a peft LoRA adapter reproducing the merge on the base (``PeftModel.from_pretrained``);
``base/``          only when the base was built from its config here (an untrained preset);
``export.json``    what was exported and how far the merged model is from the gated one: the
                   client's Self score per task both ways, the β per module, the reload checks.

Both files are checked before anything is kept: the checkpoint reloads with nothing missing or
unexpected and gives the merged model's logits, and so does the adapter on a fresh base.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client_app.evaluation import score_samples
from client_app.resources import AdaptedModel, Resources, get_resources
from client_app.state import ClientStateStore, restore_adapter_from
from client_app.training import FedMosaicClient, use_output
from drake_data.prompts import RenderedSample
from fedmosaic_core.methods import METHODS
from fedmosaic_core.models.collate import collate
from fedmosaic_core.pqlora.export import (
    NotDescribableError,
    dense_checkpoint_config,
    write_peft_adapter,
)
from fedmosaic_core.storage import atomic_build_dir, atomic_write_json
from fedmosaic_flower.config import ConfigError, FederationConfig, parse_run_config
from fedmosaic_flower.prepare import load_run_model

log = logging.getLogger("fedmosaic.export")

#: largest |logit| difference a reloaded export may show against the merged model (float32)
RELOAD_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A run, client or checkpoint that cannot be exported; the message names what is wrong."""


@dataclass
class FinishedClient:
    """One client of a finished run, its adapter restored from its last completed round."""

    run_dir: Path
    config: FederationConfig
    resources: Resources
    client: FedMosaicClient
    adapted: AdaptedModel
    round: int


def open_finished_client(run_dir: Path, client_id: str, state_dir: Path | None = None) -> FinishedClient:
    """Load ``client_id`` of the run in ``run_dir`` (its state from ``state_dir``, default the
    run's ``clients/``) with the adapter of its newest saved round."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ExportError(f"{run_dir} is not a run folder: it has no config.json")
    try:
        config = parse_run_config({k.replace("_", "-"): v for k, v in json.loads(saved.read_text()).items()})
    except (ConfigError, json.JSONDecodeError) as err:
        raise ExportError(f"{saved}: {err}") from None
    resources = get_resources(config)
    known = [str(c.client_id) for c in resources.scenario.clients]
    if client_id not in known:
        raise ExportError(f"client {client_id!r} is not in scenario {config.scenario!r} (clients: {', '.join(known)})")
    state_root = Path(state_dir) if state_dir is not None else run_dir / "clients"
    store = ClientStateStore(state_root, config.resolved_run_name, client_id)
    snapshot = store.load_latest(up_to=config.num_server_rounds)
    if snapshot is None:
        raise ExportError(f"client {client_id} has no saved round in {store.dir} (did it complete a round? "
                          "pass --state-dir where its SuperNode kept its state)")
    client = FedMosaicClient(config, resources, client_id, state_root)
    adapted = resources.build_adapted(config, client.entry.model_id)  # not the cached one: export merges it
    restore_adapter_from(snapshot, adapted.model)
    return FinishedClient(run_dir, config, resources, client, adapted, int(snapshot.meta["round"]))


def _own_train_samples(finished: FinishedClient, per_task: int) -> list[RenderedSample]:
    res = finished.resources
    return [res.samples[sid] for ref in finished.client.entry.datasets for sid in res.train_ids(ref)[:per_task]]


def _batches(processor: Any, samples: Sequence[RenderedSample], max_length: int, size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(samples), size):
        yield collate(processor, samples[start : start + size], max_length)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.float()


def _self_scores(finished: FinishedClient, model: nn.Module, eval_samples: int) -> dict[str, float]:
    cfg, res = finished.config, finished.resources
    return {
        ref.key: 100.0 * score_samples(
            model, finished.adapted.loaded.processor, res.test_samples(ref, eval_samples), scoring=cfg.scoring,
            max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens,
        ).score
        for ref in finished.client.entry.datasets
    }


def export_client(
    finished: FinishedClient, out: Path, *, beta_samples: int = 32, eval_samples: int = 0,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Write the client's personal model into ``out`` (see the module docstring); returns what
    ``export.json`` holds. ``beta_samples``: own training samples per task the β is averaged over;
    ``eval_samples``: test samples per task scored both ways (0: all)."""
    cfg, adapted = finished.config, finished.adapted
    method = METHODS[cfg.strategy]
    if method.evaluate == "logit-sum":
        raise ExportError(f"strategy {cfg.strategy!r} answers with the sum of two forwards' logits "
                          "(global branch alone + local branch alone); no single merged model reproduces it")
    if beta_samples <= 0:
        raise ExportError(f"beta-samples must be positive, got {beta_samples}")
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; choose a new one")
    model, processor = adapted.model, adapted.loaded.processor
    model.eval()
    use_output(model, method.evaluate, cfg.fixed_beta)
    own = _own_train_samples(finished, beta_samples)
    check_batch = collate(processor, own[:8], cfg.max_length)

    progress(f"measuring the gates' mean β on {len(own)} of the client's own training samples")
    with torch.no_grad():
        betas = model.mean_betas(lambda: [model(**batch) for batch in _batches(processor, own, cfg.max_length)])
    progress("scoring the gated model on the client's own tasks")
    gated_scores = _self_scores(finished, model, eval_samples)
    updates = model.low_rank_updates(betas)
    merged = model.merge_and_unload(betas, dequantize=True)
    merged_config: Any = merged.config
    merged_scores = _self_scores(finished, merged, eval_samples)
    merged_logits = _logits(merged, check_batch)
    base_name = adapted.loaded.source

    def build(tmp: Path) -> None:
        nonlocal base_name
        if not base_name:  # a base built from its config here (an untrained preset): written out too
            progress("writing the base model (built here, not loaded from a checkpoint)")
            base = load_run_model(cfg, finished.client.entry.model_id, finished.resources.data_root, quantization="none")
            base.model.save_pretrained(str(tmp / "base"))  # type: ignore[operator]
            base.processor.save_pretrained(str(tmp / "base"))
            base_name = str(Path(out).resolve() / "base")
        progress("writing the merged checkpoint and the peft adapter")
        try:
            checkpoint_config = dense_checkpoint_config(merged)
        except NotDescribableError as err:
            raise ExportError(str(err)) from None
        _save_merged(merged, checkpoint_config, tmp / "model")
        processor.save_pretrained(str(tmp / "model"))
        write_peft_adapter(merged, updates, tmp / "peft-adapter", base_name)
        progress("checking that both load again and give the merged model's logits")
        checks = _check_reloads(finished, tmp, check_batch, merged_logits)
        report = {
            "run": str(finished.run_dir), "client": finished.client.client_id, "round": finished.round,
            "model": finished.client.entry.model_id, "strategy": cfg.strategy, "base": base_name,
            "architecture": (checkpoint_config or merged_config).get_text_config().model_type,
            "beta": {"samples": len(own), "fixed": method.evaluate if isinstance(method.evaluate, float) else None,
                     "mean": sum(betas.values()) / len(betas), "min": min(betas.values()),
                     "max": max(betas.values()), "by_module": betas},
            "self_gated": gated_scores, "self_merged": merged_scores,
            "self_gap": {k: merged_scores[k] - gated_scores[k] for k in gated_scores},
            "checks": checks,
        }
        atomic_write_json(tmp / "export.json", report)

    atomic_build_dir(Path(out), build)
    return json.loads((Path(out) / "export.json").read_text())


def _save_merged(merged: nn.Module, config: Any, folder: Path) -> None:
    """``save_pretrained`` of the merged model, under ``config`` when one is given (it then keeps
    its own ``architectures``, which ``save_pretrained`` would set from the model's class)."""
    if config is None:
        merged.save_pretrained(str(folder))  # type: ignore[operator]
        return
    architectures, previous = config.architectures, merged.config
    merged.config = config
    try:
        merged.save_pretrained(str(folder))  # type: ignore[operator]
    finally:
        merged.config = previous
    config.architectures = architectures
    config.save_pretrained(str(folder))


def _check_reloads(
    finished: FinishedClient, folder: Path, batch: dict[str, torch.Tensor], expected: torch.Tensor
) -> dict[str, Any]:
    """Reload ``model/`` and ``peft-adapter/`` as a user would and compare their logits."""
    from peft import PeftModel
    from transformers import AutoConfig

    model_class: Any = type(finished.adapted.model.base_model)
    own_type = getattr(finished.adapted.model.base_model.config, "model_type", None)
    if AutoConfig.from_pretrained(str(folder / "model")).model_type != own_type:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        multimodal = finished.adapted.loaded.is_multimodal
        model_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    reloaded, info = model_class.from_pretrained(str(folder / "model"), output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    if problems:
        raise ExportError(f"the merged checkpoint does not reload whole: {problems}")
    checkpoint_diff = float((_logits(reloaded.eval(), batch) - expected).abs().max())
    del reloaded
    base = load_run_model(finished.config, finished.client.entry.model_id, finished.resources.data_root).model
    with warnings.catch_warnings():  # peft: a lora_bias on a base linear without bias cannot be merged by peft
        warnings.filterwarnings("ignore", message=r".*lora_bias=True. was passed but the targeted layer")
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        with_adapter = PeftModel.from_pretrained(base, str(folder / "peft-adapter")).eval()
    adapter_diff = float((_logits(with_adapter, batch) - expected).abs().max())
    for what, diff in (("merged checkpoint", checkpoint_diff), ("peft adapter on the base", adapter_diff)):
        if not diff <= RELOAD_TOLERANCE:
            raise ExportError(f"the reloaded {what} differs from the merged model by {diff:.3g} in the logits "
                              f"(tolerance {RELOAD_TOLERANCE:g}); nothing was kept")
    return {"checkpoint_max_abs_logit_diff": checkpoint_diff, "peft_max_abs_logit_diff": adapter_diff,
            "base_quantization": finished.config.quantization}
