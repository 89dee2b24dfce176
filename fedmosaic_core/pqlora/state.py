"""State keys of a PQ-LoRA model and the checks run before any state is written.

Keys (docs/interfaces.md):

- shared (PQ layers, architecture independent):  ``pq.{k}.{module}.P`` (r×r), ``pq.{k}.{module}.Q`` (r,)
- same-architecture (plain LoRA layers):          ``lora.{layer}.{module}.A`` (lora_r×d_in),
                                                  ``lora.{layer}.{module}.B`` (d_out×lora_r)
- local-only (never sent):                        ``gate.{layer}.{module}.weight`` (1×d_in)
- PQ bases (frozen, architecture specific):       ``pq.{k}.{module}.A`` (r×d_in), ``pq.{k}.{module}.B`` (d_out×r)

``k`` is the block position of a PQ layer (0..num_blocks−1), ``layer`` the decoder layer index.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Shape = tuple[int, ...]
Spec = dict[str, Shape]

_MAX_LISTED = 8


class AdapterStateError(ValueError):
    """An adapter state that cannot be loaded; the message names every bad key and why."""


def shared_key(block: int, module: str, name: str) -> str:
    return f"pq.{block}.{module}.{name}"


def lora_key(layer: int, module: str, name: str) -> str:
    return f"lora.{layer}.{module}.{name}"


def gate_key(layer: int, module: str) -> str:
    return f"gate.{layer}.{module}.weight"


def state_problems(state: object, spec: Spec, what: str) -> list[str]:
    """Every reason why ``state`` does not match ``spec`` (key → shape); empty when it does.

    Checked: mapping type, unknown and missing keys, non-tensor values, non-floating dtypes,
    shapes, NaN/Inf values.
    """
    if not isinstance(state, Mapping):
        return [f"{what} state must be a mapping of key → tensor, got {type(state).__name__}"]
    problems: list[str] = []
    unknown = sorted(str(k) for k in state if k not in spec)
    missing = sorted(k for k in spec if k not in state)
    if unknown:
        problems.append(f"{what}: unknown key(s) {_listed(unknown)}")
    if missing:
        problems.append(f"{what}: missing key(s) {_listed(missing)}")
    for key, shape in spec.items():
        if key not in state:
            continue
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{what}: {key} is a {type(value).__name__}, expected a torch.Tensor")
            continue
        if not value.is_floating_point():
            problems.append(f"{what}: {key} has dtype {value.dtype}, expected a floating dtype")
            continue
        if tuple(value.shape) != shape:
            problems.append(f"{what}: {key} has shape {tuple(value.shape)}, expected {shape}")
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            problems.append(f"{what}: {key} has {bad} NaN/Inf value(s)")
    return problems


def raise_if_problems(problems: list[str], action: str) -> None:
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = len(problems) - _MAX_LISTED
        raise AdapterStateError(
            f"{action} rejected, nothing was changed: {shown}"
            + (f"; … (+{more} more problem(s))" if more > 0 else "")
        )


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"[{shown}{f', … (+{more} more)' if more > 0 else ''}]"
