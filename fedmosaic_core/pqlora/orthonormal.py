"""Seeded orthonormal bases for PQ layers (the anchor initialisation, docs/method.md, "Aligning A and B across architectures" step 1).

A (r × d_in) has orthonormal rows and B (d_out × r) orthonormal columns. Each is the Q factor
of the QR decomposition of a seeded standard Gaussian matrix, with the signs fixed so that
R has a positive diagonal: a Haar-distributed orthonormal frame, reproducible from
``(seed, block position, module, which)`` alone, so every model of the same architecture gets
the same A and B.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (stable across processes and hosts)."""
    text = "|".join([str(seed), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derived_seed(seed, *parts))
    return generator


def orthonormal_columns(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 ``rows × cols`` matrix M with MᵀM = I (needs cols ≤ rows)."""
    if cols > rows:
        raise ValueError(f"cannot build {cols} orthonormal columns in dimension {rows}")
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32).contiguous()


def orthonormal_bases(
    d_in: int, d_out: int, r: int, seed: int, block: int, module: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A, B)``: A is r × d_in with orthonormal rows, B is d_out × r with orthonormal
    columns, both determined by ``(seed, block, module)``.

    Raises ``ValueError`` naming the module when r exceeds d_in or d_out.
    """
    if r > d_in:
        raise ValueError(
            f"PQ layer {block} module {module!r}: r={r} exceeds its input width d_in={d_in} "
            "(A needs r orthonormal rows)"
        )
    if r > d_out:
        raise ValueError(
            f"PQ layer {block} module {module!r}: r={r} exceeds its output width d_out={d_out} "
            "(B needs r orthonormal columns)"
        )
    a_rows = orthonormal_columns(d_in, r, seeded_generator(seed, "pq", block, module, "A")).T
    b_cols = orthonormal_columns(d_out, r, seeded_generator(seed, "pq", block, module, "B"))
    return a_rows.contiguous(), b_cols
