"""Train the committed byte-level BPE tokenizer of the tiny presets (run once; reproducible).

``python -m fedmosaic_core.models.tokenizer_build [--out DIR] [--vocab-size 3072]``

The corpus is text that ships inside installed packages (no network): the English
chatterbot-corpus YAMLs, the easy-vqa questions and answers, digit / animal / colour / shape
class words and short question templates like those of DRAKE-mini. Byte-level BPE means every
string encodes (unknown characters fall back to byte tokens), so ``<unk>`` is never produced.
Training is deterministic: the corpus is sorted and de-duplicated before training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import typer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fedmosaic_core.storage import atomic_write_text

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN]
DEFAULT_VOCAB_SIZE = 3072

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ANIMAL_WORDS = [
    "cat", "dog", "horse", "bird", "fish", "cow", "sheep", "pig", "rabbit", "elephant",
    "giraffe", "lion", "tiger", "bear", "deer", "duck", "frog", "mouse", "snake", "turtle",
]
COLOUR_WORDS = ["red", "green", "blue", "yellow", "black", "white", "gray", "brown", "teal",
                "orange", "purple", "pink"]
SHAPE_WORDS = ["circle", "rectangle", "triangle", "square", "shape"]
TEMPLATES = [
    "What digit is shown in the image?",
    "Which digit is larger?",
    "Are the two digits the same?",
    "Is the digit in the first image larger than the digit in the second image?",
    "What animal is shown in the image?",
    "Which image shows a {w}?",
    "Is this a {w}?",
    "Does the image contain a {w}?",
    "What color is the {w}?",
    "Is there a {w} in the image?",
    "Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase.",
    "Options: A. {w} B. {w} C. {w} D. {w}",
    "Is this a face?",
    "Does the picture show a human face?",
    "Choose the correct answer.",
    "The answer is {w}.",
    "USER: <image>\nWhat is in the image?\nASSISTANT: {w}",
]


def _chatterbot_lines() -> Iterator[str]:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations", []) or []:
            for turn in conversation:
                if isinstance(turn, str):
                    yield turn


def _easy_vqa_lines() -> Iterator[str]:
    import easy_vqa

    for questions, answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        yield from questions
        yield from answers
    yield from easy_vqa.get_answers()


def _template_lines() -> Iterator[str]:
    words = DIGIT_WORDS + ANIMAL_WORDS + COLOUR_WORDS + SHAPE_WORDS + [str(d) for d in range(10)]
    words += ["yes", "no", "A", "B", "C", "D", "left", "right", "first", "second", "face"]
    for template in TEMPLATES:
        for word in words:
            yield template.format(w=word)
    yield " ".join(words)


def training_corpus() -> list[str]:
    """The sorted, de-duplicated training lines (deterministic)."""
    lines = set(_chatterbot_lines()) | set(_easy_vqa_lines()) | set(_template_lines())
    return sorted(line for line in lines if line.strip())


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with the special tokens."""
    if not 512 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [512, 65536], got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return tokenizer


def tokenizer_config() -> dict[str, object]:
    """Keyword arguments the loader passes to ``PreTrainedTokenizerFast``."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "padding_side": "right",
        "model_max_length": 2048,
    }


def build(out_dir: Path = ASSETS_DIR, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train and write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``."""
    tokenizer = train_tokenizer(vocab_size)
    atomic_write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    atomic_write_text(
        out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2) + "\n"
    )
    return out_dir / "tokenizer.json"


def main(
    out: Path = typer.Option(ASSETS_DIR, help="folder for tokenizer.json + tokenizer_config.json"),
    vocab_size: int = typer.Option(DEFAULT_VOCAB_SIZE, help="BPE vocabulary size"),
) -> None:
    """Train the committed byte-level BPE tokenizer of the tiny presets."""
    path = build(out, vocab_size)
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    typer.echo(f"wrote {path} (vocab {size})")


if __name__ == "__main__":
    typer.run(main)
