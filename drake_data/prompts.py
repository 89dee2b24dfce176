"""From a DRAKE record to a model-ready sample: prompt with one ``<image>`` per image, the
answer, the loaded images and the parsed choices.

DRAKE writes choices into the question, in a few styles seen in the published preprocessing:
``Choice list:[a, b, c]``, ``Choice list:[a,b]``, ``Choice List: ['a', 'b']``,
``Choice list:[A: x| B: y]`` (answer is the letter) and option lines ``A. x`` / ``(B) y``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from drake_data.errors import DrakeDataError, where
from drake_data.layout import IMAGE_TOKEN, DrakeRecord, resolve_image_path, validate_record

TASK_TYPES = ("multi-choice", "open-ended")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class RenderedSample:
    """One sample ready for collation. ``prompt`` holds exactly ``len(images)`` ``<image>`` tokens."""

    id: str
    prompt: str
    answer: str
    images: list[Image.Image]
    choices: list[str] | None
    task_type: str

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise DrakeDataError(f"record id={self.id!r}: task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        n = self.prompt.count(IMAGE_TOKEN)
        if n != len(self.images):
            raise DrakeDataError(f"record id={self.id!r}: prompt has {n} {IMAGE_TOKEN} tokens for {len(self.images)} images")
        if self.choices is not None and len(self.choices) < 2:
            raise DrakeDataError(f"record id={self.id!r}: a choice list needs at least 2 options, got {self.choices}")


# ---------------------------------------------------------------------------- choice parsing
_CHOICE_HEAD = re.compile(r"choice\s*list\s*:?\s*\[", re.IGNORECASE)
_LETTER_PREFIX = re.compile(r"^\(?([A-J])\s*[.:)]\s*(.*)$", re.DOTALL)
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.:)]\s+(.+?)\s*$")
_QUOTED = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""")


def _bracket_body(text: str, start: int) -> str | None:
    """The text between the ``[`` before ``start`` and its matching ``]``."""
    depth = 1
    for k in range(start, len(text)):
        if text[k] == "[":
            depth += 1
        elif text[k] == "]":
            depth -= 1
            if depth == 0:
                return text[start:k]
    return None


def _strip_letter_prefixes(items: list[str]) -> list[str]:
    """``["A: x", "B: y"]`` → ``["x", "y"]`` when the items carry the letters A, B, ... in order."""
    parsed = [_LETTER_PREFIX.match(it) for it in items]
    if all(parsed) and [m.group(1) for m in parsed if m] == list(LETTERS[: len(items)]):
        return [m.group(2).strip() for m in parsed if m]
    return items


def _split_body(body: str) -> list[str]:
    stripped = body.strip()
    if stripped[:1] in ("'", '"'):
        quoted = [a if a else b for a, b in _QUOTED.findall(stripped)]
        if quoted:
            return [q.strip() for q in quoted]
    sep = "|" if "|" in stripped else ","
    return [p.strip().strip("'\"").strip() for p in stripped.split(sep)]


def parse_choices(question: str) -> list[str] | None:
    """The options written in a DRAKE question, letter prefixes removed; ``None`` if there are none."""
    heads = list(_CHOICE_HEAD.finditer(question))
    if heads:
        body = _bracket_body(question, heads[-1].end())
        if body is not None:
            items = [it for it in _split_body(body) if it]
            if len(items) >= 2:
                return _strip_letter_prefixes(items)
    lines = [m for m in (_OPTION_LINE.match(line) for line in question.splitlines()) if m]
    letters = [m.group(1) for m in lines]
    if len(lines) >= 2 and letters == list(LETTERS[: len(lines)]):
        return [m.group(2) for m in lines]
    return None


# --------------------------------------------------------------------------------- rendering
def normalise_placeholders(prompt: str, n_images: int, record_id: str) -> str:
    """Keep the record's own placeholders when their count matches; prepend them when absent."""
    n = prompt.count(IMAGE_TOKEN)
    if n == n_images:
        return prompt
    if n == 0:
        return IMAGE_TOKEN * n_images + "\n" + prompt
    raise DrakeDataError(
        f"record id={record_id!r}: question has {n} {IMAGE_TOKEN} placeholders but the record lists {n_images} images"
    )


def load_image(path: Path) -> Image.Image:
    """Open an image fully into memory as RGB (the file handle is closed)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def render_sample(record: dict[str, Any] | DrakeRecord, root: Path | str, task_type: str | None = None) -> RenderedSample:
    """Record → :class:`RenderedSample`. ``task_type`` defaults to multi-choice when the question
    carries a choice list, else open-ended (pass the scenario's ``type`` to override)."""
    rec = record if isinstance(record, DrakeRecord) else validate_record(record)
    root = Path(root)
    question, answer = rec.conversations[0].value.strip(), rec.conversations[1].value.strip()
    paths = rec.image_paths
    prompt = normalise_placeholders(question, len(paths), rec.id)
    images: list[Image.Image] = []
    for img in paths:
        found = resolve_image_path(root, img)
        if found is None:
            raise DrakeDataError(f"{where(record_id=rec.id)}: image file not found: {img!r} (root {root})")
        try:
            images.append(load_image(found))
        except OSError as exc:
            raise DrakeDataError(f"{where(record_id=rec.id)}: cannot read image {found}: {exc}") from None
    choices = parse_choices(question)
    if task_type is None:
        task_type = "multi-choice" if choices else "open-ended"
    return RenderedSample(id=rec.id, prompt=prompt, answer=answer, images=images, choices=choices, task_type=task_type)
