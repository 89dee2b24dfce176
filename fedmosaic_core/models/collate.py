"""Batches for training and generation from rendered samples (chat template of :mod:`.tokenizer`).

Sequence of one sample: ``[bos] USER: {prompt with <image> expanded}\\nASSISTANT: {answer}</s>``
for the tiny presets; a model whose tokenizer has a chat template of its own gets its prompts in
that template (the user turn; the answer is the reply with the template's end-of-turn tokens).
Training batches are right-padded and carry ``labels`` = -100 everywhere except the answer
tokens and the closing eos; generation batches stop after ``ASSISTANT:`` and are left-padded so
that every row's next token is at the end.

Nothing is ever cut: a sample longer than ``max_length`` raises :class:`PromptTooLongError`,
which names the sample and its lengths (cutting prompt text would silently drop the question).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedmosaic_core.modeling import IGNORE_INDEX
from fedmosaic_core.pqlora.model import branch_logit_sum, gate_pooling

from .tokenizer import ASSISTANT_PREFIX, CHAT_TEMPLATE, USER_PREFIX, answer_text


class PromptTooLongError(ValueError):
    """A sample does not fit ``max_length`` (the message names the sample and every length)."""


class SampleLike(Protocol):
    """What collate needs of ``drake_data.prompts.RenderedSample``."""

    @property
    def id(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def answer(self) -> str: ...
    @property
    def images(self) -> list[Any]: ...


@dataclass
class TokenizedSample:
    """Token ids of one sample and where its answer starts."""

    input_ids: list[int]
    num_prompt_tokens: int  # ids[:num_prompt_tokens] is BOS + prompt (no labels)
    images: list[Any]


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def image_token_count(processor: Any, pixel_values: torch.Tensor) -> int:
    """Placeholder tokens one image becomes, as ``LlavaProcessor.replace_image_token`` counts."""
    patch_size = getattr(processor, "patch_size", None)
    if patch_size is None:
        raise ValueError(
            f"{type(processor).__name__} has no patch_size: collate supports LLaVA-style "
            "processors (LlavaProcessor) for samples with images"
        )
    height, width = pixel_values.shape[-2:]
    count = (height // patch_size) * (width // patch_size)
    count += int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1
    return int(count)


def _image_token(processor: Any) -> str:
    return str(getattr(processor, "image_token", None) or "<image>")


def _check_images(sample: SampleLike, image_token: str, multimodal: bool) -> None:
    placeholders = sample.prompt.count(image_token)
    if placeholders != len(sample.images):
        raise ValueError(
            f"sample {sample.id!r}: the prompt has {placeholders} {image_token} placeholder(s) "
            f"but {len(sample.images)} image(s)"
        )
    if sample.images and not multimodal:
        raise ValueError(
            f"sample {sample.id!r} has images but the processor is a text-only tokenizer"
        )


def pixel_values_for(processor: Any, samples: Sequence[SampleLike]) -> torch.Tensor | None:
    """All images of the batch, in order, as one ``(n_images, 3, H, W)`` tensor (or None)."""
    images = [image.convert("RGB") for sample in samples for image in sample.images]
    if not images:
        return None
    if not hasattr(processor, "image_processor"):
        with_images = next(s for s in samples if s.images)
        raise ValueError(
            f"sample {with_images.id!r} has images but the processor is a text-only tokenizer"
        )
    out = processor.image_processor(images=images, return_tensors="pt")
    return torch.as_tensor(out["pixel_values"])


def tokenize_sample(
    processor: Any,
    sample: SampleLike,
    max_length: int,
    *,
    with_answer: bool,
    tokens_per_image: int,
) -> TokenizedSample:
    """Ids of ``[bos] prompt`` (+ ``answer eos``); raises :class:`PromptTooLongError` when they
    exceed ``max_length``."""
    tokenizer = _tokenizer(processor)
    image_token = _image_token(processor)
    _check_images(sample, image_token, hasattr(processor, "image_processor"))
    expanded = sample.prompt.replace(image_token, image_token * tokens_per_image)
    prompt_ids, answer_ids = _sample_ids(tokenizer, expanded, sample, with_answer)
    total = len(prompt_ids) + len(answer_ids)
    if total > max_length:
        n_images = len(sample.images)
        raise PromptTooLongError(
            f"sample {sample.id!r} needs {total} tokens ({n_images} image(s) x {tokens_per_image}, "
            f"{total - n_images * tokens_per_image - len(answer_ids)} prompt text and chat tokens, "
            f"{len(answer_ids)} answer tokens) but max-length is {max_length}: raise max-length "
            "(nothing is cut, so that no question text is lost)"
        )
    return TokenizedSample(prompt_ids + answer_ids, len(prompt_ids), list(sample.images))


#: tokenizer → {(vocabulary size, chat template, expanded prompt, answer or None): (prompt ids,
#: answer ids)}. The same questions are scored every round and the same samples trained on for
#: several; their ids are computed once per tokenizer (it lives as long as the cached model that
#: uses it). Tokens added or a template set later miss the cache.
_IDS_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...]]]]
_IDS_CACHE = weakref.WeakKeyDictionary()
_IDS_CACHE_ENTRIES = 1 << 17  # per tokenizer; emptied when full


def _sample_ids(tokenizer: Any, expanded: str, sample: SampleLike, with_answer: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a sample whose prompt has its image tokens expanded (cached)."""
    try:
        cache = _IDS_CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    key = (len(tokenizer), getattr(tokenizer, "chat_template", None), expanded, sample.answer if with_answer else None)
    found = cache.get(key)
    if found is None:
        prompt_ids, answer_ids = _tokenized_ids(tokenizer, expanded, sample, with_answer)
        if len(cache) >= _IDS_CACHE_ENTRIES:
            cache.clear()
        found = cache[key] = (tuple(prompt_ids), tuple(answer_ids))
    return list(found[0]), list(found[1])


def _tokenized_ids(tokenizer: Any, expanded: str, sample: SampleLike, with_answer: bool) -> tuple[list[int], list[int]]:
    if uses_own_chat_template(tokenizer):
        return _own_template_ids(tokenizer, expanded, sample, with_answer)
    # "USER:" | " {prompt}" | "\nASSISTANT:" tokenised separately so the split is exact.
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + [
        token for part in (USER_PREFIX.rstrip(), " " + expanded, ASSISTANT_PREFIX)
        for token in tokenizer.encode(part, add_special_tokens=False)
    ]
    answer_ids = (
        tokenizer.encode(answer_text(sample.answer, tokenizer.eos_token), add_special_tokens=False)
        if with_answer
        else []
    )
    return prompt_ids, answer_ids


def uses_own_chat_template(tokenizer: Any) -> bool:
    """Whether prompts go through the tokenizer's own chat template: it has one, and it is not
    the tiny presets' fixed ``USER: … ASSISTANT:`` scaffold (:data:`.tokenizer.CHAT_TEMPLATE`)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(template) and template != CHAT_TEMPLATE


def _own_template_ids(tokenizer: Any, prompt: str, sample: SampleLike, with_answer: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) in the model's chat template: the prompt is the template's
    generation prompt for one user turn; the answer is what the full conversation adds after it
    (the reply and the template's end-of-turn tokens), tokenised separately so the split is exact."""
    user = [{"role": "user", "content": prompt}]
    prompt_text_ = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt_text_, add_special_tokens=False)
    if not with_answer:
        return prompt_ids, []
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": sample.answer}], tokenize=False)
    if not full.startswith(prompt_text_) or sample.answer.strip() not in full[len(prompt_text_) :]:
        raise ValueError(
            f"sample {sample.id!r}: the model's chat template does not continue its generation prompt "
            f"with the reply {sample.answer!r}; the answer tokens cannot be told apart from the prompt"
        )
    return prompt_ids, tokenizer.encode(full[len(prompt_text_) :], add_special_tokens=False)


def _tokens_per_image(processor: Any, pixel_values: torch.Tensor | None) -> int:
    return image_token_count(processor, pixel_values) if pixel_values is not None else 0


def _tokenized_batch(
    processor: Any, samples: Sequence[SampleLike], max_length: int, with_answer: bool
) -> tuple[list[Any], torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Each sample tokenized, the pixel values, and a pad-filled ids tensor with a zero mask."""
    if not samples:
        raise ValueError(f"{'collate' if with_answer else 'collate_for_generation'} needs at least one sample")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tokenizer = _tokenizer(processor)
    pixel_values = pixel_values_for(processor, samples)
    per_image = _tokens_per_image(processor, pixel_values)
    tokenized = [
        tokenize_sample(processor, s, max_length, with_answer=with_answer, tokens_per_image=per_image)
        for s in samples
    ]
    width = max(len(t.input_ids) for t in tokenized)
    input_ids = torch.full((len(samples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    return tokenized, pixel_values, input_ids, attention_mask


def _with_pixels(batch: dict[str, torch.Tensor], pixel_values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    return batch


def collate(
    processor: Any, samples: Sequence[SampleLike], max_length: int = 256
) -> dict[str, torch.Tensor]:
    """Right-padded training batch: input_ids, attention_mask, labels (+ pixel_values)."""
    tokenized, pixel_values, input_ids, attention_mask = _tokenized_batch(
        processor, samples, max_length, with_answer=True
    )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, item in enumerate(tokenized):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, item.num_prompt_tokens : len(ids)] = ids[item.num_prompt_tokens :]
    return _with_pixels({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, pixel_values)


def collate_for_generation(
    processor: Any, samples: Sequence[SampleLike], max_length: int = 256
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (no answers, no labels) for ``generate``."""
    tokenized, pixel_values, input_ids, attention_mask = _tokenized_batch(
        processor, samples, max_length, with_answer=False
    )
    width = input_ids.shape[1]
    for row, item in enumerate(tokenized):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    return _with_pixels({"input_ids": input_ids, "attention_mask": attention_mask}, pixel_values)


def _generator_of(model: nn.Module) -> Any:
    """The object with ``generate``: the model itself or the HF model it wraps."""
    current: Any = model
    for _ in range(3):
        if callable(getattr(current, "generate", None)):
            return current
        current = getattr(current, "model", None) or getattr(current, "base_model", None)
        if current is None:
            break
    raise TypeError(f"{type(model).__name__} has no generate() (nor a wrapped model with one)")


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The model's own stop tokens (``generation_config.eos_token_id``: one id or several, e.g.
    Llama-3-Instruct's ``<|eot_id|>`` beside ``<|end_of_text|>``) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    samples: Sequence[SampleLike],
    max_new_tokens: int = 16,
    max_length: int = 256,
) -> list[str]:
    """Greedy answers (decoded, stripped) for each sample's prompt."""
    if not samples:
        return []
    tokenizer = _tokenizer(processor)
    generator = _generator_of(model)
    device = next(generator.parameters()).device
    batch = collate_for_generation(processor, samples, max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    if "pixel_values" in batch:
        dtype = next(p.dtype for p in generator.parameters() if p.is_floating_point())
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    was_training = generator.training
    generator.eval()
    try:
        if getattr(model, "logit_sum_betas", None):
            new_tokens = _greedy_logit_sum(model, generator, batch, max_new_tokens, tokenizer.pad_token_id,
                                           stop_token_ids(generator, tokenizer))
        else:
            output = generator.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(generator, tokenizer),
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
    finally:
        generator.train(was_training)
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _greedy_logit_sum(
    model: nn.Module, generator: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, pad: int, stops: list[int]
) -> torch.Tensor:
    """Greedy decoding on the summed logits of :func:`branch_logit_sum` (FedSim), one full forward
    per branch and new token (no cache: the branches' caches differ). Rows that stopped get pad."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    stop = torch.tensor(stops, device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens count from 0

        def forward(ids: torch.Tensor = ids, mask: torch.Tensor = mask, positions: torch.Tensor = positions) -> torch.Tensor:
            with gate_pooling(model, mask):
                return generator(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits[:, -1]

        token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), branch_logit_sum(model, forward).argmax(-1))
        new.append(token)
        done |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
        if bool(done.all()):
            break
    return torch.stack(new, dim=1)
