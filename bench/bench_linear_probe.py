"""Do the bases see the visual attributes? A linear probe on frozen image features.

For each preset (pretrained on the public split of DRAKE-mini ``--seed``, as a run prepares it,
and the same architecture untrained), the image features are the multi-modal projector's output
of all of an image's tokens, concatenated. A logistic regression is fitted on public-pool images and scored
on test-pool images (never seen in pretraining) for each attribute the client tasks ask about:
digit (10 classes), colour (8), shape (3), animal (10). Chance is the majority-class rate.

    python bench/bench_linear_probe.py [--seed 0] [--max-per-split 1000]
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch
import typer
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from drake_data.mini.builder import MODELS, attribute_pools
from fedmosaic_core.models import load_model
from fedmosaic_flower.prepare import DrakePublicSplit, default_public_data_root

app = typer.Typer(add_completion=False)


@torch.no_grad()
def image_features(loaded, images: np.ndarray, batch: int = 256) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Projector output of every image token, concatenated: (n, tokens × hidden), what the LM sees."""
    out = []
    for start in range(0, len(images), batch):
        pil = [Image.fromarray(im) for im in images[start : start + batch]]
        pixels = loaded.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        feats = loaded.model.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        out.append(feats.float().flatten(1).numpy())
    return np.concatenate(out)


def probe_accuracy(train_x: np.ndarray, train_y: list, test_x: np.ndarray, test_y: list) -> float:  # type: ignore[type-arg]
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())


@app.command()
def main(seed: int = 0, max_per_split: int = 1000) -> None:
    torch.set_num_threads(1)
    pools = attribute_pools(seed)
    public = DrakePublicSplit(default_public_data_root(seed))
    results: dict[str, dict[str, float]] = {}
    chance = {}
    for attribute, splits in pools.items():
        labels = [str(v) for v in splits["test"][1][:max_per_split]]
        chance[attribute] = max(Counter(labels).values()) / len(labels)
    for model_id in MODELS:
        for label, kwargs in (("pretrained", {"public_split": public}), ("untrained", {"random_init": True})):
            loaded = load_model(model_id, seed=seed, **kwargs)
            loaded.model.eval()
            row = {}
            for attribute, splits in pools.items():
                (tr_img, tr_y), (te_img, te_y) = splits["public"], splits["test"]
                tr_img, tr_y = tr_img[:max_per_split], [str(v) for v in tr_y[:max_per_split]]
                te_img, te_y = te_img[:max_per_split], [str(v) for v in te_y[:max_per_split]]
                row[attribute] = probe_accuracy(image_features(loaded, tr_img), tr_y, image_features(loaded, te_img), te_y)
            results[f"{model_id} {label}"] = row
            print(f"{model_id:14s} {label:10s} " + "  ".join(f"{a} {100 * v:5.1f}" for a, v in row.items()), flush=True)
    print("chance (majority)       " + "  ".join(f"{a} {100 * v:5.1f}" for a, v in chance.items()))
    print(json.dumps({"seed": seed, "accuracy": results, "chance": chance}))


if __name__ == "__main__":
    app()
