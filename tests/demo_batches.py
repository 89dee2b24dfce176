"""Real text batches of different tasks, tokenised byte-level, for probing task vectors in tests
and benchmarks without the project tokenizer.

Tasks: chatterbot-corpus English categories (``chatterbot:food``, ``chatterbot:computers``, ...)
and easy-vqa question types (``easyvqa:color``, ``easyvqa:shape``, ``easyvqa:yesno``; the
question text only). Token ids: 0 pad, 1 bos, 2 eos, byte b → b + 3 (vocabulary 259).
Labels are -100 except the answer bytes and the final eos.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_VOCAB_SIZE = 259
EASY_VQA_TYPES = ("color", "shape", "yesno")


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


@lru_cache(maxsize=32)
def chatterbot_pairs(category: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of one English chatterbot-corpus category."""
    import chatterbot_corpus
    import yaml

    path = Path(chatterbot_corpus.__file__).parent / "data" / "english" / f"{category}.yml"
    if not path.is_file():
        raise ValueError(f"chatterbot-corpus has no English category {category!r}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    pairs = []
    for conversation in data.get("conversations", []):
        if len(conversation) >= 2 and isinstance(conversation[0], str) and isinstance(conversation[1], str):
            pairs.append((conversation[0], conversation[1]))
    return tuple(pairs)


def _easy_vqa_type(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yesno"
    return "color" if "color" in question else "shape"


@lru_cache(maxsize=8)
def easy_vqa_pairs(question_type: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of one easy-vqa question type (train split)."""
    if question_type not in EASY_VQA_TYPES:
        raise ValueError(f"easy-vqa question type must be one of {EASY_VQA_TYPES}, got {question_type!r}")
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    return tuple(
        (q, a) for q, a in zip(questions, answers, strict=True) if _easy_vqa_type(q, a) == question_type
    )


def task_pairs(task: str) -> tuple[tuple[str, str], ...]:
    source, _, name = task.partition(":")
    if source == "chatterbot":
        return chatterbot_pairs(name)
    if source == "easyvqa":
        return easy_vqa_pairs(name)
    raise ValueError(f"unknown task {task!r}; expected 'chatterbot:<category>' or 'easyvqa:<type>'")


def byte_batch(pairs: list[tuple[str, str]], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (answer bytes + eos only)."""
    rows: list[tuple[list[int], list[int]]] = []
    for question, answer in pairs:
        prompt = [BOS_ID, *byte_ids(f"Q: {question}\nA: ")]
        target = [*byte_ids(answer), EOS_ID]
        ids = (prompt + target)[:max_length]
        labels = ([-100] * len(prompt) + target)[:max_length]
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    label_ids = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        label_ids[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


def task_batches(
    task: str, *, num_batches: int, batch_size: int, seed: int, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` seeded random batches of one task."""
    pairs = list(task_pairs(task))
    rng = random.Random(f"{task}:{seed}")
    return [byte_batch(rng.sample(pairs, batch_size), max_length) for _ in range(num_batches)]


DEMO_TASKS = (
    "chatterbot:food",
    "chatterbot:computers",
    "chatterbot:greetings",
    "easyvqa:color",
    "easyvqa:shape",
    "easyvqa:yesno",
)


def probed_task_vectors(d_model: int, d_ff: int, tasks: tuple[str, ...] = DEMO_TASKS) -> list:
    """One client per task on a seeded tiny Llama probe: 3 probe updates of 8 real samples each,
    sanitised and averaged (RELA's task vectors as numpy arrays)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmosaic_core.rela import TaskVectorAccumulator, TaskVectorProbe

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=d_model, intermediate_size=d_ff,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        )
    ).eval()
    probe = TaskVectorProbe(model)
    vectors = []
    for client, task in enumerate(tasks):
        accumulator = TaskVectorAccumulator(probe, seed=0, noise_seed=client)
        for step, batch in enumerate(task_batches(task, num_batches=3, batch_size=8, seed=client)):
            if not accumulator.maybe_update(step * accumulator.every_m_steps, batch):
                raise RuntimeError(f"probe step {step} of {task} did not update the task vector")
        vectors.append(accumulator.end_round().numpy())
    return vectors
