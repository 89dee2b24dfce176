"""Tiny presets, tokenizer, loading (incl. 4-bit on CPU), fingerprints, collation, preparation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_models_standin import standin_public_samples
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration

from fedmosaic_core.models import (
    PRESETS,
    ArchitectureFingerprint,
    ModelNotAvailableError,
    UnknownPresetError,
    collate,
    collate_for_generation,
    generate_answers,
    load_model,
    load_tiny_tokenizer,
)
from fedmosaic_core.models.collate import IGNORE_INDEX, PromptTooLongError
from fedmosaic_core.models.presets import NUM_IMAGE_TOKENS
from fedmosaic_core.models.pretrain import (
    PretrainConfig,
    answer_loss,
    find_prepared,
    prepare_preset,
    samples_digest,
)
from fedmosaic_core.models.tokenizer import CHAT_TEMPLATE
from fedmosaic_core.models.tokenizer_build import ASSETS_DIR, SPECIAL_TOKENS, train_tokenizer
from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

SAMPLES = standin_public_samples(40, seed=1)
PQ = PQLoRAConfig(r=8, alpha=16, dropout=0.0, gate_noise=False, seed=0)


# ------------------------------------------------------------------------------ tokenizer
def test_committed_tokenizer_is_reproducible_and_byte_level() -> None:
    committed = Tokenizer.from_file(str(ASSETS_DIR / "tokenizer.json"))
    rebuilt = train_tokenizer()
    assert committed.get_vocab() == rebuilt.get_vocab()
    assert 2000 <= committed.get_vocab_size() <= 4096
    tok = load_tiny_tokenizer()
    for token in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id or token == "<unk>"
    text = "Ünïcødé 漢字 — emoji 🙂 and tabs\t!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode("<image>", add_special_tokens=False) == [tok.convert_tokens_to_ids("<image>")]


# -------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_inject_forward_backward_save_reload(preset: str, tmp_path: Path) -> None:
    loaded = load_model(preset, random_init=True, device="cpu")
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert loaded.fingerprint.num_layers >= 4
    batch = collate(loaded.processor, SAMPLES[:6], max_length=128)
    assert "pixel_values" in batch and batch["pixel_values"].shape[-2:] == (32, 32)
    wrapped = inject_pqlora(loaded.model, PQ)
    wrapped.train()
    loss = wrapped(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for group in wrapped.parameter_groups().values() for p in group]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # P/Q start at zero, so LoRA B (zero init) gets no gradient yet but P must
    assert any(float(p.grad.abs().sum()) > 0 for p in wrapped.parameter_groups()["pq"])

    fresh = load_model(preset, random_init=True, device="cpu")
    fresh.model.save_pretrained(tmp_path)
    fresh.processor.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path, device="cpu")
    assert reloaded.fingerprint == fresh.fingerprint
    eval_batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = fresh.model(**eval_batch).logits
        got = reloaded.model(**eval_batch).logits
    torch.testing.assert_close(got, expected)
    assert collate(reloaded.processor, SAMPLES[:6], 128)["input_ids"].equal(batch["input_ids"])


def test_presets_differ_in_size_and_family() -> None:
    prints = {name: load_model(name, random_init=True).fingerprint for name in PRESETS}
    small, medium = prints["tiny-llama-s"], prints["tiny-llama-m"]
    assert medium.hidden_size > small.hidden_size and medium.num_layers > small.num_layers
    assert prints["tiny-qwen2-s"].family == "qwen2" and small.family == "llama"
    assert len({fp.id for fp in prints.values()}) == 3
    assert abs(medium.intermediate_size / medium.hidden_size - 2.7) < 0.1


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_id_is_stable_and_decides_sharing() -> None:
    a = load_model("tiny-llama-s", random_init=True, seed=0).fingerprint
    b = load_model("tiny-llama-s", random_init=True, seed=1).fingerprint
    assert a == b and a.id == "llama-d64-L4-ff176-q64-kv32-r-"
    assert a.with_rank(16).id == "llama-d64-L4-ff176-q64-kv32-r16"
    assert a.with_rank(16) != a.with_rank(8)
    assert ArchitectureFingerprint.from_dict(a.with_rank(8).to_dict()) == a.with_rank(8)
    with pytest.raises(ValueError, match="hidden_size"):
        ArchitectureFingerprint("llama", 0, 4, 8, 4, 4)
    with pytest.raises(ValueError, match="unknown fingerprint fields"):
        ArchitectureFingerprint.from_dict({**a.to_dict(), "vocab": 3})


# -------------------------------------------------------------------------------- collate
def test_collate_labels_only_answer_and_eos_right_padded() -> None:
    loaded = load_model("tiny-qwen2-s", random_init=True)
    tok = loaded.tokenizer
    samples = SAMPLES[:5]  # includes a two-image and a text-only sample
    batch = collate(loaded.processor, samples, max_length=128)
    n_images = sum(len(s.images) for s in samples)
    assert batch["pixel_values"].shape[0] == n_images
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == n_images * NUM_IMAGE_TOKENS
    for row, sample in enumerate(samples):
        labels = batch["labels"][row]
        answer = tok.decode(labels[labels != IGNORE_INDEX])
        assert answer == f" {sample.answer}</s>"
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all()  # right padding
        assert (batch["input_ids"][row, length:] == tok.pad_token_id).all()
        assert (labels[length:] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, 0] == tok.bos_token_id
        assert tok.decode(batch["input_ids"][row, :length]).startswith("<s>USER:")

    gen = collate_for_generation(loaded.processor, samples, max_length=128)
    assert "labels" not in gen
    for row in range(len(samples)):
        length = int(gen["attention_mask"][row].sum())
        assert gen["attention_mask"][row, -length:].all()  # left padding
        assert tok.decode(gen["input_ids"][row, -3:]).endswith("\nASSISTANT:")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_tokenizer_with_its_own_chat_template_gets_its_prompts_in_it() -> None:
    """A real model's tokenizer (here: the tiny one given a ChatML template, as SmolLM2 has):
    prompts are its template's generation prompt, the labelled answer is what the conversation
    adds after it (the reply and the end-of-turn tokens); generation prompts end where training's
    answers start. The tiny presets' own scaffold stays as it was."""
    loaded = load_model("tiny-llama-s", random_init=True)
    tok = loaded.tokenizer
    text_samples = [s for s in SAMPLES if not s.images][:2]
    plain = collate(tok, text_samples, max_length=128)
    tok.chat_template = CHATML
    try:
        batch = collate(tok, text_samples, max_length=128)
        gen = collate_for_generation(tok, text_samples, max_length=128)
        for row, sample in enumerate(text_samples):
            length = int(batch["attention_mask"][row].sum())
            labels = batch["labels"][row]
            assert tok.decode(batch["input_ids"][row, :length]) == (
                f"<|im_start|>user\n{sample.prompt}<|im_end|>\n<|im_start|>assistant\n{sample.answer}<|im_end|>\n")
            assert tok.decode(labels[labels != IGNORE_INDEX]) == f"{sample.answer}<|im_end|>\n"
            prompt_length = int((labels == IGNORE_INDEX)[:length].sum())
            generation = gen["input_ids"][row][gen["attention_mask"][row].bool()]
            assert torch.equal(generation, batch["input_ids"][row, :prompt_length])
        tok.chat_template = "{{ messages[0]['content'] }}"  # a template that drops the reply
        with pytest.raises(ValueError, match="chat template does not continue"):
            collate(tok, text_samples, max_length=128)
    finally:
        tok.chat_template = CHAT_TEMPLATE
    assert torch.equal(collate(tok, text_samples, max_length=128)["input_ids"], plain["input_ids"])


def test_token_ids_are_computed_once_per_tokenizer_and_follow_added_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same sample collated again reuses its ids (no tokenizer call) and gets the same batch;
    a token added to the tokenizer afterwards is used, not a stale cached split."""
    tok = load_model("tiny-llama-s", random_init=True).tokenizer
    sample = LooseSample("s-cache", "Is the zorbleflax red?", "Yes", [])
    first = collate(tok, [sample], max_length=128)
    calls: list[str] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: calls.append(text) or encode(text, **kw))
    again = collate(tok, [sample], max_length=128)
    assert calls == [] and all(torch.equal(first[k], again[k]) for k in first)
    tok.add_tokens(["zorbleflax"])
    new_id = tok.convert_tokens_to_ids("zorbleflax")
    after = collate(tok, [sample], max_length=128)
    assert calls and new_id in after["input_ids"][0].tolist() and new_id not in first["input_ids"][0].tolist()


def test_collate_never_cuts_a_prompt_and_names_the_lengths_when_it_cannot_fit() -> None:
    loaded = load_model("tiny-llama-s", random_init=True)
    two_images = next(s for s in SAMPLES if len(s.images) == 2)
    full = collate(loaded.processor, [two_images], max_length=512)["input_ids"].shape[1]
    exact = collate(loaded.processor, [two_images], max_length=full)
    assert exact["input_ids"].shape[1] == full
    for generation in (False, True):
        make = collate_for_generation if generation else collate
        needed = full - (0 if not generation else len(loaded.tokenizer.encode(" " + two_images.answer + "</s>", add_special_tokens=False)))
        with pytest.raises(PromptTooLongError, match=rf"sample '{two_images.id}' needs {needed} tokens "
                           rf"\(2 image\(s\) x {NUM_IMAGE_TOKENS}.*max-length is {needed - 1}"):
            make(loaded.processor, [two_images], max_length=needed - 1)


@dataclass
class LooseSample:
    """Duck-typed sample without RenderedSample's own placeholder check."""

    id: str
    prompt: str
    answer: str
    images: list[Any]


def test_collate_rejects_placeholder_mismatch_and_images_for_text_models() -> None:
    loaded = load_model("tiny-llama-s", random_init=True)
    image = next(s for s in SAMPLES if len(s.images) == 1).images[0]
    with pytest.raises(ValueError, match="'bad'.*0 <image> placeholder.*1 image"):
        collate(loaded.processor, [LooseSample("bad", "no placeholder", "x", [image])], 64)
    with pytest.raises(ValueError, match="text-only tokenizer"):
        collate(loaded.tokenizer, [LooseSample("t", "<image>\nq", "x", [image])], 64)
    text_only = collate(loaded.tokenizer, [LooseSample("t", "What is two plus two?", "four", [])], 64)
    assert "pixel_values" not in text_only


def test_generate_answers_returns_text_for_wrapped_model() -> None:
    loaded = load_model("tiny-llama-s", random_init=True)
    wrapped = inject_pqlora(loaded.model, PQ)
    answers = generate_answers(wrapped, loaded.processor, SAMPLES[:3], max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------------------ 4-bit CPU
def test_nf4_on_cpu_evaluate_then_train_keeps_gradients() -> None:
    import bitsandbytes as bnb

    loaded = load_model("tiny-llama-s", quantization="nf4", random_init=True, device="cpu")
    four_bit = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 4 * 7  # the language model's linears only
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.model.vision_tower.modules())
    wrapped = inject_pqlora(loaded.model, PQ)
    batch = collate(loaded.processor, SAMPLES[:4], 128)
    wrapped.eval()
    with torch.no_grad():  # the docs/method.md, "Offline models" trap: an eval forward first
        eval_loss = wrapped(**batch).loss
    assert torch.isfinite(eval_loss)
    wrapped.train()
    params = [p for group in wrapped.parameter_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = wrapped(**batch).loss
        loss.backward()
        assert all(p.grad is not None for p in wrapped.parameter_groups()["pq"])
        assert sum(float(p.grad.abs().sum()) for p in wrapped.parameter_groups()["pq"]) > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -------------------------------------------------------------------------------- errors
def test_bad_model_names_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownPresetError, match="tiny-llama-xl.*known presets: tiny-llama-m"):
        load_model("tiny-llama-xl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="(?s)'nobody/no-such-model'.*HF_HUB_OFFLINE is set"):
        load_model("nobody/no-such-model")
    with pytest.raises(ModelNotAvailableError, match="not a model directory"):
        load_model(tmp_path)
    with pytest.raises(ModelNotAvailableError, match="fedmosaic prepare-models"):
        load_model("tiny-llama-s", prepare_if_missing=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown quantization 'fp3'"):
        load_model("tiny-llama-s", quantization="fp3", random_init=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- preparation
def test_prepare_is_cached_deterministic_and_loadable(tmp_path: Path) -> None:
    config = PretrainConfig(steps=4, batch_size=4, max_length=128)
    first = prepare_preset("tiny-llama-s", SAMPLES, tmp_path / "a" / "models", 0, config,
                           evaluate_accuracy=False)
    again = prepare_preset("tiny-llama-s", SAMPLES, tmp_path / "a" / "models", 0, config,
                           evaluate_accuracy=False)
    other = prepare_preset("tiny-llama-s", SAMPLES, tmp_path / "b" / "models", 0, config,
                           evaluate_accuracy=False)
    assert first == again and samples_digest(SAMPLES)[:12] in first.name
    weights = (first / "model.safetensors").read_bytes()
    assert weights == (other / "model.safetensors").read_bytes()  # same seed → same weights
    record = json.loads((first / "prepare.json").read_text())
    assert record["preset"] == "tiny-llama-s" and record["config"]["steps"] == 4
    assert not list((tmp_path / "a" / "models").glob(".*tmp-*"))  # no temp leftovers
    assert find_prepared("tiny-llama-s", 0, cache_dir=tmp_path / "a") == first
    assert find_prepared("tiny-llama-s", 1, cache_dir=tmp_path / "a") is None
    loaded = load_model("tiny-llama-s", cache_dir=tmp_path / "a", prepare_if_missing=False)
    built = load_model("tiny-llama-s", random_init=True)
    changed = [n for n, p in loaded.model.state_dict().items()
               if not torch.equal(p, built.model.state_dict()[n])]
    assert changed  # the prepared weights, not the random initialisation


def test_pretraining_collates_the_next_batch_ahead_and_trains_on_the_seeded_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next batch is collated in a second thread while a step trains; the steps still see
    the seeded batch order, each batch once, exactly as collated in turn (same weights)."""
    import threading

    from fedmosaic_core.models import pretrain as pretrain_module

    seen: list[tuple[str, list[str]]] = []
    real_collate = pretrain_module.collate

    def recording_collate(processor: Any, samples: Any, max_length: int) -> dict[str, torch.Tensor]:
        seen.append((threading.current_thread().name, [s.id for s in samples]))
        return real_collate(processor, samples, max_length)

    trained: list[torch.Tensor] = []
    real_loss = pretrain_module.pretrain_loss
    monkeypatch.setattr(pretrain_module, "collate", recording_collate)
    monkeypatch.setattr(pretrain_module, "pretrain_loss",
                        lambda model, batch: trained.append(batch["input_ids"]) or real_loss(model, batch))
    loaded = load_model("tiny-llama-s", random_init=True)
    config = PretrainConfig(steps=5, batch_size=3, max_length=128)
    pretrain_module.pretrain(loaded.model, loaded.processor, SAMPLES, config, seed=3)

    order = pretrain_module._batches(len(SAMPLES), 3, torch.Generator().manual_seed(3))
    expected = [[SAMPLES[i].id for i in next(order)] for _ in range(5)]
    assert [ids for _, ids in seen] == expected
    assert all(name.startswith("collate") for name, _ in seen)
    for ids, batch in zip(expected, trained, strict=True):
        again = real_collate(loaded.processor, [next(s for s in SAMPLES if s.id == i) for i in ids], 128)
        assert torch.equal(batch, again["input_ids"])


def test_pretraining_lowers_held_out_answer_loss(tmp_path: Path) -> None:
    samples = standin_public_samples(200, seed=2)
    train, held = samples[:170], samples[170:]
    loaded = load_model("tiny-llama-s", random_init=True)
    before = answer_loss(loaded.model, loaded.processor, held, 128)
    from fedmosaic_core.models.pretrain import pretrain

    pretrain(loaded.model, loaded.processor, train, PretrainConfig(steps=60, batch_size=8), seed=0)
    after = answer_loss(loaded.model, loaded.processor, held, 128)
    assert after < 0.5 * before


def test_prepare_presets_on_drake_mini_then_load_by_data_root(tmp_path: Path) -> None:
    from drake_data.mini import build_drake_mini
    from fedmosaic_core.models.pretrain import prepare_presets
    from fedmosaic_flower.prepare import DrakePublicSplit

    root = build_drake_mini(tmp_path / "drake", seed=0, size="tiny")
    cache = tmp_path / "cache"
    public = DrakePublicSplit(root)
    prepared = prepare_presets(public, cache, seed=0, presets=["tiny-qwen2-s", "tiny-llama-s"],
                               steps={"tiny-qwen2-s": 3, "tiny-llama-s": 2}, workers=2)  # two worker processes
    assert json.loads((prepared["tiny-llama-s"] / "prepare.json").read_text())["config"]["steps"] == 2
    directory = prepared["tiny-qwen2-s"]
    assert public.digest()[:12] in directory.name
    record = json.loads((directory / "prepare.json").read_text())
    assert record["num_train"] > 0 and record["after"]["held_out_answer_loss"] > 0
    loaded = load_model("tiny-qwen2-s", cache_dir=cache, public_split=public, prepare_if_missing=False)
    assert loaded.fingerprint.family == "qwen2"
    with pytest.raises(ModelNotAvailableError, match="not prepared"):
        load_model("tiny-qwen2-s", seed=5, cache_dir=cache, public_split=public,
                   prepare_if_missing=False)


def test_text_only_local_checkpoint_loads_plain_and_nf4(tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tiny_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text = [LooseSample("t", "What is two plus two?", "four", [])]
    plain = load_model(str(tmp_path))
    assert isinstance(plain.model, LlamaForCausalLM) and not plain.is_multimodal
    assert plain.fingerprint.id == "llama-d32-L4-ff64-q32-kv16-r-"
    batch = collate(plain.processor, text, 64)
    quantised = load_model(tmp_path, quantization="nf4", cache_dir=tmp_path / "cache")
    layers = [m for m in quantised.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with torch.no_grad():
        full, four = plain.model(**batch).loss, quantised.model(**batch).loss
    assert abs(float(full) - float(four)) < 0.5  # same weights, 4-bit rounding only
    # the next load (a deployment's next message) reads the kept pre-quantised copy: same model
    assert len(list((tmp_path / "cache" / "quantized").glob("*/config.json"))) == 1
    again = load_model(tmp_path, quantization="nf4", cache_dir=tmp_path / "cache")
    layers = [m for m in again.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    with torch.no_grad():
        assert torch.equal(again.model(**batch).logits, quantised.model(**batch).logits)
    assert again.fingerprint.id == quantised.fingerprint.id


_PRETRAIN_UNTIL_STOPPED = """
import signal, sys
from pathlib import Path
from drake_data.mini import build_drake_mini
from fedmosaic_cli.main import _exit_on_signal
from fedmosaic_core.models.pretrain import prepare_presets
from fedmosaic_flower.prepare import DrakePublicSplit

signal.signal(signal.SIGTERM, _exit_on_signal)  # what every fedmosaic command installs
tmp = Path(sys.argv[1])
public = DrakePublicSplit(build_drake_mini(tmp / "drake", seed=0, size="tiny"))
print("training", flush=True)
prepare_presets(public, tmp / "cache", seed=0, presets=["tiny-qwen2-s", "tiny-llama-s"],
                steps={"tiny-qwen2-s": 100_000, "tiny-llama-s": 100_000}, workers=2)
"""


def test_sigterm_stops_preset_pretraining_and_its_workers_at_once(tmp_path: Path) -> None:
    """A SIGTERM (``docker stop``, a CI timeout) while presets pretrain in worker processes ends the
    command within seconds, the workers with it, and leaves no prepared model behind; a process
    pool that waited for its jobs kept training for minutes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedmosaic_cli.launch import _process_table

    process = subprocess.Popen([sys.executable, "-c", _PRETRAIN_UNTIL_STOPPED, str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"training"
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2:  # the two spawned workers, started and importing or training
            assert time.monotonic() < deadline, "the pretraining workers did not start"
            time.sleep(0.5)
            workers = [pid for pid, (parent, _, _) in _process_table().items()
                       if parent == process.pid and "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        time.sleep(15)  # well into training
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        took = time.monotonic() - stopped
        assert code == 128 + signal.SIGTERM and took < 30, (code, took)
        time.sleep(1)
        assert not [pid for pid in workers if pid in _process_table() and _process_table()[pid][2] != "Z"]
        assert not list((tmp_path / "cache").rglob("prepare.json"))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        leftovers = [pid for pid, (_, group, _) in _process_table().items() if group == process.pid]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
