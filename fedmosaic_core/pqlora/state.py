"""The one owner of PQ-LoRA state keys, schemas and their validation (docs/method.md, "PQ-LoRA").

Keys:

- shared (PQ layers, architecture independent):  ``pq.{k}.{module}.P`` (r×r), ``pq.{k}.{module}.Q`` (r,)
- same-architecture (plain LoRA layers):          ``lora.{layer}.{module}.A`` (lora_r×d_in),
                                                  ``lora.{layer}.{module}.B`` (d_out×lora_r)
- local-only (never sent):                        ``gate.{layer}.{module}.weight`` (1×d_in)
- PQ bases (frozen, architecture specific):       ``pq.{k}.{module}.A`` (r×d_in), ``pq.{k}.{module}.B`` (d_out×r)

``k`` is the block position of a PQ layer (0..num_blocks−1), ``layer`` the decoder layer index.
A *schema* (``Spec``) maps every key of a part to its shape. Aggregation, the server's
handshake, adapter loading and A/B alignment all build and check keys through this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

Shape = tuple[int, ...]
Spec = dict[str, Shape]
Part = Literal["shared", "same-arch", "local-only", "pq-bases"]

_MAX_LISTED = 8
_MODULE = r"[A-Za-z][A-Za-z0-9_]{0,63}"
KEY_PATTERNS: dict[str, re.Pattern[str]] = {
    "shared": re.compile(rf"^pq\.(\d{{1,4}})\.({_MODULE})\.(P|Q)$"),
    "same-arch": re.compile(rf"^lora\.(\d{{1,4}})\.({_MODULE})\.(A|B)$"),
    "local-only": re.compile(rf"^gate\.(\d{{1,4}})\.({_MODULE})\.weight$"),
    "pq-bases": re.compile(rf"^pq\.(\d{{1,4}})\.({_MODULE})\.(A|B)$"),
}


class AdapterStateError(ValueError):
    """An adapter state that cannot be loaded; the message names every bad key and why."""


def shared_key(block: int, module: str, name: str) -> str:
    return f"pq.{block}.{module}.{name}"


def lora_key(layer: int, module: str, name: str) -> str:
    return f"lora.{layer}.{module}.{name}"


def gate_key(layer: int, module: str) -> str:
    return f"gate.{layer}.{module}.weight"


def is_key(part: str, key: object) -> bool:
    """Whether ``key`` is a well-formed key of ``part``."""
    return isinstance(key, str) and KEY_PATTERNS[part].match(key) is not None


def rank_of(key: str, shape: Shape) -> int | None:
    """r read off a PQ / LoRA shape (P: r×r, Q: r, A: r×d_in, B: d_out×r)."""
    if not shape:
        return None
    return shape[-1] if key.endswith(".B") else shape[0]


def parse_spec(raw: object, part: str, max_keys: int = 4096) -> Spec:
    """A schema received as JSON (key → list of ints) → ``Spec``; ValueError naming what is wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{part} schema must be an object of key → shape, got {type(raw).__name__}")
    if len(raw) > max_keys:
        raise ValueError(f"{part} schema has {len(raw)} keys (at most {max_keys})")
    spec: Spec = {}
    for key, shape in raw.items():
        if not is_key(part, key):
            raise ValueError(f"malformed {part} key {key!r}")
        if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 2
                or not all(type(s) is int and 0 < s <= 1 << 20 for s in shape)):
            raise ValueError(f"{part} key {key!r}: shape must be 1 or 2 positive integers, got {shape!r}")
        spec[key] = tuple(shape)
    return spec


def key_problem(part: str, key: str, value: object, want: Shape, check_finite: bool = True) -> str | None:
    """Why ``value`` cannot be ``part[key]`` of shape ``want``, or None."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"{part} {key!r} is not a floating-point torch.Tensor"
    shape = tuple(value.shape)
    if shape != want:
        got_r, want_r = rank_of(key, shape), rank_of(key, want)
        if len(shape) == len(want) and got_r != want_r:
            return f"wrong rank r={got_r} (expected r={want_r}): {part} {key!r} has shape {shape}, expected {want}"
        return f"wrong shape: {part} {key!r} has shape {shape}, expected {want}"
    if check_finite and not bool(torch.isfinite(value).all()):
        return f"non-finite values (NaN/Inf) in {part} {key!r}"
    return None


def first_problem(part: str, state: object, spec: Spec, check_finite: bool = True) -> str | None:
    """The first reason why ``state`` does not match ``spec`` (a received update), or None."""
    if not isinstance(state, Mapping):
        return f"{part} state is a {type(state).__name__}, not a dict"
    if state.keys() != spec.keys():
        for key in sorted(map(str, state)):
            if not is_key(part, key):
                return f"malformed {part} key {key!r}"
            if key not in spec:
                return f"unknown {part} key {key!r}"
        missing = sorted(set(spec) - set(state))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"missing {part} key {missing[0]!r}{more}"
    for key, want in spec.items():
        value = state[key]
        if not check_finite and type(value) is torch.Tensor and value.shape == want and value.is_floating_point():
            continue  # the common case, without the checks that name a problem
        problem = key_problem(part, key, value, want, check_finite)
        if problem:
            return problem
    return None


def state_problems(state: object, spec: Spec, what: str) -> list[str]:
    """Every reason why ``state`` does not match ``spec`` (key → shape); empty when it does."""
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
        if key in state:
            problem = key_problem(what, key, state[key], shape)
            if problem:
                problems.append(problem)
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
