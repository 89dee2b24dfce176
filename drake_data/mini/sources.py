"""Real data shipped inside installed packages (docs/method.md, "Offline models"), loaded offline as 32×32 RGB arrays.

- scikit-learn digits: 1797 8×8 hand-written digits (a copy of the UCI optical digits set).
- easy-vqa: 5000 64×64 images of one coloured shape, with 48k generated questions.
- animal-mnist: 10,000 28×28 animal silhouettes, 10 classes. Its files are gzip'd pickles of
  numpy arrays; they are read with an unpickler that only admits numpy's array reconstruction.
- scikit-image ``lfw_subset``: 100 face and 100 non-face 25×25 crops from LFW.
- chatterbot-corpus: English conversation snippets in 21 categories (YAML).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drake_data.errors import DrakeDataError

log = logging.getLogger(__name__)
SIZE = 32
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "gray", "black", "brown")


@dataclass
class ImageSource:
    """Images (N×32×32×3 uint8) with per-image attributes; duplicates already removed."""

    name: str
    images: np.ndarray
    attrs: list[dict[str, Any]]
    native_test: np.ndarray | None = None  # bool per image: the package's own test split
    duplicates_removed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _to_rgb32(arr: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    im = Image.fromarray(arr)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (SIZE, SIZE):
        im = im.resize((SIZE, SIZE), resample)
    return np.asarray(im, dtype=np.uint8)


def _dedupe(name: str, images: np.ndarray, attrs: list[dict[str, Any]],
            native_test: np.ndarray | None = None) -> ImageSource:
    """Drop pixel-identical repeats (first kept), so that no image can sit on both sides of a split."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, img in enumerate(images):
        h = hashlib.sha256(img.tobytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    removed = len(images) - len(keep)
    if removed:
        log.info("%s: %d pixel-identical duplicate images skipped", name, removed)
    idx = np.asarray(keep)
    return ImageSource(name, images[idx], [attrs[i] for i in keep],
                       None if native_test is None else native_test[idx], removed)


def load_digits_source() -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.clip(digits.images / 16.0 * 255.0, 0, 255).round().astype(np.uint8)
    images = np.stack([_to_rgb32(im, Image.Resampling.BILINEAR) for im in raw])
    attrs = [{"digit": int(t)} for t in digits.target]
    return _dedupe("Digits", images, attrs)


_WORD = re.compile(r"[a-z]+")


def _facts(question: str, answer: str) -> list[tuple[str, str]]:
    """(attribute, value) pairs a question/answer pair states about its image: a shape or colour
    answer, or an affirmed yes/no question (``"is there not a red shape?" → "no"`` affirms red)."""
    if answer in SHAPES:
        return [("shape", answer)]
    if answer in COLORS:
        return [("color", answer)]
    if answer not in ("yes", "no"):
        return []
    words = _WORD.findall(question.lower())
    negated = "not" in words or "no" in words
    if (answer == "yes") == negated:
        return []
    return [("shape", w) for w in words if w in SHAPES] + [("color", w) for w in words if w in COLORS]


def load_easy_vqa_source() -> ImageSource:
    import easy_vqa

    images: list[np.ndarray] = []
    attrs: list[dict[str, Any]] = []
    native_test: list[bool] = []
    unlabeled = 0
    for is_test, (questions, paths) in enumerate([
        (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    ]):
        per_image: dict[int, dict[str, Any]] = {}
        for text, answer, image_id in zip(*questions, strict=True):
            info = per_image.setdefault(int(image_id), {"questions": []})
            info["questions"].append((str(text), str(answer)))
            for key, value in _facts(str(text), str(answer)):
                info[key] = value
        for image_id in sorted(paths):
            info = per_image.get(image_id, {})
            if "shape" not in info or "color" not in info:
                unlabeled += 1
                continue
            with Image.open(paths[image_id]) as im:
                arr = np.asarray(im.convert("RGB"))
            images.append(_to_rgb32(arr, Image.Resampling.BOX))
            attrs.append({"shape": info["shape"], "color": info["color"], "questions": info["questions"],
                          "native_id": image_id})
            native_test.append(bool(is_test))
    if unlabeled:
        log.info("EasyVQA: %d images skipped (their questions never name both shape and colour)", unlabeled)
    src = _dedupe("EasyVQA", np.stack(images), attrs, np.asarray(native_test))
    src.extra["unlabeled_skipped"] = unlabeled
    return src


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from animal-mnist data")


def _animal_file(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise DrakeDataError("package animal-mnist is not installed (pip install --no-deps animal-mnist==0.4)")
    return Path(spec.origin).parent / "data" / "Animal_MNIST" / name


def load_animal_source() -> ImageSource:
    arrays = []
    for fname in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with gzip.open(_animal_file(fname), "rb") as fh:
            arrays.append(np.asarray(_NumpyOnlyUnpickler(fh).load()))
    data, labels = arrays
    data = data.reshape(-1, 28, 28).astype(np.uint8)
    padded = np.zeros((len(data), SIZE, SIZE), dtype=np.uint8)
    padded[:, 2:30, 2:30] = data
    images = np.repeat(padded[..., None], 3, axis=-1)
    attrs = [{"animal": ANIMALS[int(y)]} for y in labels]
    return _dedupe("AnimalShapes", images, attrs)


def load_faces_source() -> ImageSource:
    from skimage.data import lfw_subset

    raw = lfw_subset()  # (200, 25, 25) in [0, 1]; first 100 faces
    arr = (np.clip(raw, 0, 1) * 255).round().astype(np.uint8)
    images = np.stack([_to_rgb32(im, Image.Resampling.BILINEAR) for im in arr])
    attrs = [{"face": i < 100} for i in range(len(arr))]
    return _dedupe("Faces", images, attrs)


def load_chat_corpus() -> dict[str, list[list[str]]]:
    """category (file stem) → conversations (lists of utterances, whitespace collapsed)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise DrakeDataError("package chatterbot-corpus is not installed")
    folder = Path(spec.origin).parent / "data" / "english"
    out: dict[str, list[list[str]]] = {}
    for f in sorted(folder.glob("*.yml")):
        with f.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        convs = doc.get("conversations") or []
        out[f.stem] = [[" ".join(str(u).split()) for u in conv] for conv in convs if isinstance(conv, list)]
    return out


SOURCE_LICENCES = {
    "scikit-learn": ("sklearn digits (8×8 hand-written digits, a copy of the UCI Optical Recognition of "
                     "Handwritten Digits set)", "BSD-3-Clause (scikit-learn); UCI data: CC BY 4.0"),
    "easy-vqa": ("easy-VQA (generated shapes with questions)", "MIT (Copyright (c) 2019 Victor Zhou)"),
    "animal-mnist": ("Animal-MNIST silhouettes (10 classes)", "MIT (Sina Mohammadi)"),
    "scikit-image": ("skimage.data.lfw_subset (100 faces / 100 non-faces from Labeled Faces in the Wild)",
                     "BSD-3-Clause (scikit-image); LFW images are public web photos released for research"),
    "chatterbot-corpus": ("ChatterBot English corpus (conversation snippets, 21 categories)", "BSD-3-Clause"),
}


def package_versions() -> dict[str, str]:
    out = {}
    for dist in SOURCE_LICENCES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
