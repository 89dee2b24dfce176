"""The one error type of `drake_data`: bad benchmark input, always naming the file and record."""

from __future__ import annotations

from pathlib import Path


class DrakeDataError(ValueError):
    """Malformed or missing benchmark data; the message names the file and the record."""


def where(file: Path | str | None = None, index: int | None = None, record_id: object = None) -> str:
    """A location prefix such as ``"/r/VSR/train/dataset-0.json, record #3 (id='x')"``."""
    parts: list[str] = []
    if file is not None:
        parts.append(str(file))
    if index is not None:
        rec = f"record #{index}"
        if record_id is not None:
            rec += f" (id={record_id!r})"
        parts.append(rec)
    elif record_id is not None:
        parts.append(f"record id={record_id!r}")
    return ", ".join(parts) if parts else "<input>"
