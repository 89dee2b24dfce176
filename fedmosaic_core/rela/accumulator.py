"""Client-side sanitising, round averaging and cross-round smoothing of task vectors.

Every ``every_m_steps`` local steps the probe gradient ``G`` (d_model × d_ff) is sanitised —
the same fixed ``rows_fraction`` of rows on every client (chosen from the shared ``seed``) plus
Gaussian noise of std ``noise_std`` — and added to the round's sum. ``end_round`` returns
``ĝ ← (round mean + ĝ) / 2`` (the first round: ĝ = round mean).

**Not differential privacy.** The row subsampling and the small noise are a heuristic that makes
the upload less directly a gradient of the client's data; they come with no (ε, δ) guarantee and
must not be described as one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedmosaic_core.rela.probe import TaskVectorProbe
from fedmosaic_core.storage import atomic_write_with

_FORMAT = "fedmosaic-rela-accumulator-v1"


def selected_rows(d_model: int, rows_fraction: float, seed: int) -> torch.Tensor:
    """The sorted row indices every client keeps: ``round(rows_fraction · d_model)`` of them."""
    count = max(1, round(rows_fraction * d_model))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(d_model, generator=generator)[:count].sort().values


class TaskVectorAccumulator:
    """Sanitise probe gradients, average them within a round, smooth across rounds.

    ``noise_seed`` is the client's private noise seed (None: a fresh random one, kept in the
    state so that a resumed client continues the same noise stream). ``seed`` is shared by all
    clients and fixes the kept rows. See the module docstring: not differential privacy.
    """

    def __init__(
        self,
        probe: TaskVectorProbe | None = None,
        *,
        rows_fraction: float = 0.4,
        noise_std: float = 1e-4,
        every_m_steps: int = 10,
        seed: int = 0,
        noise_seed: int | None = None,
    ) -> None:
        if not (0.0 < rows_fraction <= 1.0):
            raise ValueError(f"TaskVectorAccumulator: rows_fraction must be in (0, 1], got {rows_fraction!r}")
        if not (noise_std >= 0.0):
            raise ValueError(f"TaskVectorAccumulator: noise_std must be >= 0, got {noise_std!r}")
        if not isinstance(every_m_steps, int) or every_m_steps < 1:
            raise ValueError(f"TaskVectorAccumulator: every_m_steps must be an int >= 1, got {every_m_steps!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"TaskVectorAccumulator: seed must be a non-negative int, got {seed!r}")
        self.probe = probe
        self.rows_fraction = float(rows_fraction)
        self.noise_std = float(noise_std)
        self.every_m_steps = every_m_steps
        self.seed = seed
        self.noise_seed = secrets.randbits(62) if noise_seed is None else int(noise_seed)
        self.shape: tuple[int, int] | None = None  # (d_model, d_ff) of the probe gradient
        self.rows: torch.Tensor | None = None
        self.round_sum: torch.Tensor | None = None
        self.round_count = 0
        self.smoothed: torch.Tensor | None = None
        self.rounds_completed = 0
        self.total_updates = 0

    # -- accumulation -------------------------------------------------------------------------
    def _init_shape(self, shape: tuple[int, int]) -> None:
        if self.shape is None:
            self.shape = shape
            self.rows = selected_rows(shape[0], self.rows_fraction, self.seed)
        elif self.shape != shape:
            raise ValueError(f"TaskVectorAccumulator: gradient has shape {shape}, expected {self.shape}")

    def sanitise(self, gradient: torch.Tensor) -> torch.Tensor:
        """Keep the shared rows, add Gaussian noise (std ``noise_std``) from the private stream."""
        if gradient.ndim != 2:
            raise ValueError(f"TaskVectorAccumulator: expected a 2-D gradient, got {tuple(gradient.shape)}")
        self._init_shape((int(gradient.shape[0]), int(gradient.shape[1])))
        assert self.rows is not None
        kept = gradient.detach().float().cpu()[self.rows]
        if not torch.isfinite(kept).all():
            raise ValueError("TaskVectorAccumulator: the gradient has NaN or Inf values")
        generator = torch.Generator().manual_seed((self.noise_seed * 1_000_003 + self.total_updates) % 2**63)
        return kept + self.noise_std * torch.randn(kept.shape, generator=generator)

    def add(self, gradient: torch.Tensor) -> None:
        """Sanitise ``gradient`` and add it to this round's sum."""
        sanitised = self.sanitise(gradient)
        self.round_sum = sanitised if self.round_sum is None else self.round_sum + sanitised
        self.round_count += 1
        self.total_updates += 1

    def maybe_update(self, step: int, batch: Mapping[str, Any]) -> bool:
        """On steps with ``step % every_m_steps == 0`` run the probe on ``batch`` and add the
        sanitised gradient; returns whether it did."""
        if step % self.every_m_steps != 0:
            return False
        if self.probe is None:
            raise RuntimeError("TaskVectorAccumulator.maybe_update needs a probe (pass probe=...)")
        self.add(self.probe.gradient(batch))
        return True

    def end_round(self) -> torch.Tensor:
        """ĝ ← (round mean + ĝ) / 2 (first round: the mean); a round without updates keeps ĝ."""
        if self.round_count > 0:
            assert self.round_sum is not None
            mean = self.round_sum / self.round_count
            self.smoothed = mean if self.smoothed is None else (mean + self.smoothed) / 2.0
        elif self.smoothed is None:
            raise RuntimeError("TaskVectorAccumulator.end_round: no task-vector update yet")
        self.round_sum = None
        self.round_count = 0
        self.rounds_completed += 1
        assert self.smoothed is not None
        return self.smoothed.clone()

    @property
    def task_vector(self) -> torch.Tensor | None:
        """The current smoothed ĝ (rows_kept × d_ff), or None before the first round ends."""
        return None if self.smoothed is None else self.smoothed.clone()

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata): everything needed to resume after a restart."""
        tensors: dict[str, torch.Tensor] = {}
        if self.round_sum is not None:
            tensors["round_sum"] = self.round_sum.contiguous()
        if self.smoothed is not None:
            tensors["smoothed"] = self.smoothed.contiguous()
        meta = {
            "format": _FORMAT,
            "rows_fraction": self.rows_fraction,
            "noise_std": self.noise_std,
            "every_m_steps": self.every_m_steps,
            "seed": self.seed,
            "noise_seed": self.noise_seed,
            "shape": list(self.shape) if self.shape is not None else None,
            "round_count": self.round_count,
            "rounds_completed": self.rounds_completed,
            "total_updates": self.total_updates,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if meta.get("format") != _FORMAT:
            raise ValueError(f"TaskVectorAccumulator: unknown state format {meta.get('format')!r}")
        for key in ("rows_fraction", "noise_std", "every_m_steps", "seed"):
            if meta[key] != getattr(self, key):
                raise ValueError(
                    f"TaskVectorAccumulator: saved {key}={meta[key]!r} differs from this "
                    f"accumulator's {getattr(self, key)!r}"
                )
        self.noise_seed = int(meta["noise_seed"])
        self.shape = None
        self.rows = None
        if meta["shape"] is not None:
            self._init_shape((int(meta["shape"][0]), int(meta["shape"][1])))
        expected = (len(self.rows), self.shape[1]) if self.rows is not None and self.shape else None
        for key in ("round_sum", "smoothed"):
            if key in tensors and tuple(tensors[key].shape) != expected:
                raise ValueError(
                    f"TaskVectorAccumulator: saved {key} has shape {tuple(tensors[key].shape)}, expected {expected}"
                )
        self.round_sum = tensors["round_sum"].float().clone() if "round_sum" in tensors else None
        self.smoothed = tensors["smoothed"].float().clone() if "smoothed" in tensors else None
        self.round_count = int(meta["round_count"])
        self.rounds_completed = int(meta["rounds_completed"])
        self.total_updates = int(meta["total_updates"])
        if (self.round_count > 0) != (self.round_sum is not None):
            raise ValueError("TaskVectorAccumulator: saved round_count and round_sum disagree")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write the state as one safetensors file (metadata in its header)."""
        path = Path(path)
        tensors, meta = self.state_dict()
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"rela_accumulator": json.dumps(meta)}))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore the state written by :meth:`save` (the configuration must match)."""
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if "rela_accumulator" not in header:
                raise ValueError(f"{path}: not a TaskVectorAccumulator state file")
            meta = json.loads(header["rela_accumulator"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        self.load_state_dict(tensors, meta)
