"""Pretrain the tiny presets on a public split, once, and cache them (docs/method.md, "Offline models").

All weights (vision tower, projector, language model) are trained from their seeded random
initialisation with AdamW (linear warm-up, cosine decay) on the public split minus a held-out
slice, so a preset learns the answer format and names what it sees (digit, colour, shape,
animal) before any client adapts it. The loss is the cross-entropy of the answer tokens (and the
closing eos); only those positions go through the output head, which is most of a tiny model's
cost (:func:`.scoring.answer_loss_mean`). Presets are prepared in parallel worker processes, one
per core.

The public split is anything that implements :class:`PublicSplit` (a digest that keys the cache
and the rendered samples); the benchmark package provides DRAKE-mini's, the command line is
``fedmosaic prepare-models``. Cache layout under ``cache_dir`` (default: :func:`cache_home`)::

    models/<preset>-seed<seed>-<data hash>-v<recipe>/   save_pretrained output + prepare.json
    models/<preset>-seed<seed>.latest.json              pointer used when no public split is given

Folders are built in a temporary sibling and renamed into place; a file lock makes concurrent
callers prepare a preset once. The same seed, data and thread count give the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedmosaic_core.storage import atomic_build_dir, atomic_write_json, cache_home, file_lock

from .collate import SampleLike, collate, generate_answers
from .presets import PRESETS, build_preset, preset_spec
from .scoring import answer_loss_mean, answer_token_logits

RECIPE_VERSION = 2
MAX_HELD_OUT = 64


@dataclass(frozen=True)
class PretrainConfig:
    """Budget and optimiser of the preparation run (per preset)."""

    steps: int = 700
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_length: int = 128
    held_out_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError(f"steps, batch_size and max_length must be positive: {self}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 < self.held_out_fraction < 0.5:
            raise ValueError(f"held_out_fraction must be in (0, 0.5), got {self.held_out_fraction}")


#: Steps of 64 samples (about 10-11 passes over DRAKE-mini's public split). With two workers the
#: larger preset trains while the two small ones train one after the other.
DEFAULT_STEPS = {"tiny-llama-s": 650, "tiny-llama-m": 600, "tiny-qwen2-s": 650}


# ----------------------------------------------------------------------------------- data
class PublicSplit(Protocol):
    """Public data the presets are pretrained on: ``digest()`` keys the cache (cheap, no
    rendering); ``samples()`` renders them, only when a preset must actually be trained."""

    def digest(self) -> str: ...

    def samples(self) -> Sequence[SampleLike]: ...


def samples_digest(samples: Sequence[SampleLike]) -> str:
    """sha256 over every sample's id, prompt, answer and image pixels (the data part of the key)."""
    digest = hashlib.sha256()
    for sample in samples:
        for text in (sample.id, sample.prompt, sample.answer):
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
        for image in sample.images:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
        digest.update(b"\1")
    return digest.hexdigest()


def split_held_out(
    samples: Sequence[SampleLike], fraction: float, seed: int
) -> tuple[list[SampleLike], list[SampleLike]]:
    """Deterministic (train, held-out) split; held-out size = min(fraction·n, 64), at least 1."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, min(MAX_HELD_OUT, int(len(samples) * fraction)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    if not train:
        raise ValueError(f"only {len(samples)} public samples: too few to pretrain")
    return [samples[i] for i in train], [samples[i] for i in held]


# ------------------------------------------------------------------------------- training
def pretrain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and eos)."""
    return answer_loss_mean(model, batch)


@torch.no_grad()
def answer_loss(
    model: nn.Module, processor: Any, samples: Sequence[SampleLike], max_length: int, batch_size: int = 16
) -> float:
    """Mean cross-entropy per answer token (answer + eos) over ``samples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        batch = collate(processor, samples[start : start + batch_size], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, targets, _ = answer_token_logits(model, batch)
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += int(targets.numel())
    model.train(was_training)
    return total / max(count, 1)


def answer_accuracy(
    model: nn.Module, processor: Any, samples: Sequence[SampleLike], max_length: int, batch_size: int = 16
) -> float:
    """Fraction of samples whose greedy answer equals the reference (case-insensitive)."""
    correct = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        answers = generate_answers(model, processor, chunk, max_new_tokens=8, max_length=max_length)
        correct += sum(a.strip().lower() == s.answer.strip().lower() for a, s in zip(answers, chunk, strict=True))
    return correct / max(len(samples), 1)


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start : start + batch_size]


def pretrain(
    model: nn.Module,
    processor: Any,
    train_samples: Sequence[SampleLike],
    config: PretrainConfig,
    seed: int = 0,
) -> dict[str, float]:
    """Train all weights of ``model`` in place; returns timing and the final training loss."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(train_samples), min(config.batch_size, len(train_samples)), generator)

    def collated(indices: list[int]) -> dict[str, torch.Tensor]:
        return collate(processor, [train_samples[i] for i in indices], config.max_length)

    start = time.perf_counter()
    recent: list[float] = []
    # the next batch is collated in a second thread while this one trains (torch releases the
    # GIL in its kernels); the batches, and so the weights, are the same as collated in turn
    with ThreadPoolExecutor(1, thread_name_prefix="collate") as prefetch:
        upcoming = prefetch.submit(collated, next(batches))
        for step in range(config.steps):
            batch = upcoming.result()
            if step + 1 < config.steps:
                upcoming = prefetch.submit(collated, next(batches))
            loss = pretrain_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            recent = (recent + [loss.item()])[-20:]
    model.eval()
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "seconds_per_step": seconds / config.steps,
            "final_train_loss": sum(recent) / len(recent)}


# ---------------------------------------------------------------------------------- cache
def prepared_dir_name(preset: str, seed: int, data_hash: str) -> str:
    return f"{preset}-seed{seed}-{data_hash[:12]}-v{RECIPE_VERSION}"


def _models_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else cache_home()) / "models"


def _pointer(models_dir: Path, preset: str, seed: int) -> Path:
    return models_dir / f"{preset}-seed{seed}.latest.json"


def find_prepared(
    preset: str,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    data_hash: str | None = None,
) -> Path | None:
    """The prepared directory of ``preset`` (exact data key when ``data_hash`` is given, else the
    latest preparation for this seed), or None."""
    preset_spec(preset)
    models_dir = _models_dir(cache_dir)
    if data_hash is not None:
        directory = models_dir / prepared_dir_name(preset, seed, data_hash)
        return directory if (directory / "prepare.json").is_file() else None
    pointer = _pointer(models_dir, preset, seed)
    if not pointer.is_file():
        return None
    directory = models_dir / str(json.loads(pointer.read_text(encoding="utf-8"))["dir"])
    return directory if (directory / "prepare.json").is_file() else None


def prepare_preset(
    preset: str,
    samples: Sequence[SampleLike],
    models_dir: Path,
    seed: int = 0,
    config: PretrainConfig | None = None,
    *,
    data_hash: str | None = None,
    evaluate_accuracy: bool = True,
) -> Path:
    """Pretrain one preset on ``samples`` and save it under ``models_dir`` (reused if present)."""
    config = config or PretrainConfig(steps=DEFAULT_STEPS.get(preset, 300))
    data_hash = data_hash or samples_digest(samples)  # callers with a data root pass its digest
    directory = models_dir / prepared_dir_name(preset, seed, data_hash)
    models_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir / f".{directory.name}.lock"):
        if not (directory / "prepare.json").is_file():
            if not samples:
                raise ValueError(f"no public samples to prepare {preset!r} with")
            _train_and_save(preset, samples, directory, seed, config, data_hash, evaluate_accuracy)
        atomic_write_json(_pointer(models_dir, preset, seed), {"dir": directory.name})
    return directory


def _train_and_save(
    preset: str, samples: Sequence[SampleLike], directory: Path, seed: int,
    config: PretrainConfig, data_hash: str, evaluate_accuracy: bool,
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_preset(preset, seed)
        train, held_out = split_held_out(samples, config.held_out_fraction, seed)
        before = {"held_out_answer_loss": answer_loss(model, processor, held_out, config.max_length)}
        if evaluate_accuracy:
            before["held_out_accuracy"] = answer_accuracy(model, processor, held_out, config.max_length)
        timing = pretrain(model, processor, train, config, seed)
        after = {"held_out_answer_loss": answer_loss(model, processor, held_out, config.max_length)}
        if evaluate_accuracy:
            after["held_out_accuracy"] = answer_accuracy(model, processor, held_out, config.max_length)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record = {
            "preset": preset, "seed": seed, "data_hash": data_hash, "recipe_version": RECIPE_VERSION,
            "num_train": len(train), "num_held_out": len(held_out), "config": asdict(config),
            "before": before, "after": after, **timing,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(tmp / "prepare.json", record)

    atomic_build_dir(directory, save)


def _prepare_in_worker(
    name: str, samples: list[SampleLike], models_dir: Path, seed: int, config: PretrainConfig, data_hash: str, threads: int
) -> Path:
    torch.set_num_threads(threads)
    return prepare_preset(name, samples, models_dir, seed, config, data_hash=data_hash)


def prepare_presets(
    public: PublicSplit,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    presets: Sequence[str] | None = None,
    *,
    steps: dict[str, int] | None = None,
    workers: int | None = None,
) -> dict[str, Path]:
    """Prepare (or reuse) every preset; returns ``{preset: directory}``. Presets that must be
    trained are trained in ``workers`` processes (default: one per core, at most one per preset),
    each with ``cores // workers`` threads."""
    names = list(presets) if presets is not None else list(PRESETS)
    for name in names:
        preset_spec(name)
    cache = Path(cache_dir).expanduser() if cache_dir else cache_home()
    data_hash = public.digest()
    models_dir = cache / "models"
    configs = {n: PretrainConfig(steps=(steps or {}).get(n, DEFAULT_STEPS.get(n, 700))) for n in names}
    todo = [n for n in names if not (models_dir / prepared_dir_name(n, seed, data_hash) / "prepare.json").is_file()]
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(todo)))
    if len(todo) > 1 and workers > 1:
        import multiprocessing

        samples = list(public.samples())  # rendered only when something must be trained
        # a multiprocessing pool, not a ProcessPoolExecutor: leaving its block on an exception (a
        # SIGTERM turned into SystemExit, Ctrl-C) terminates the workers at once, where an executor
        # would wait for every preset to finish training
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            jobs = [pool.apply_async(_prepare_in_worker, (n, samples, models_dir, seed, configs[n], data_hash,
                                                          max(1, cores // workers))) for n in todo]
            for job in jobs:
                job.get()
    out: dict[str, Path] = {}
    samples_once: list[SampleLike] | None = None
    for name in names:
        ready = models_dir / prepared_dir_name(name, seed, data_hash)
        if samples_once is None and not (ready / "prepare.json").is_file():
            samples_once = list(public.samples())
        out[name] = prepare_preset(name, samples_once or [], models_dir, seed, configs[name], data_hash=data_hash)
    return out
