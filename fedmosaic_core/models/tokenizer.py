"""The committed tokenizer of the tiny presets and the chat template every model here uses.

Chat template (training labels and generation prompts use the same text)::

    <s>USER: {prompt}\\nASSISTANT: {answer}</s>

The prompt part ends at ``"ASSISTANT:"``; the answer part is ``" " + answer + eos``. Only the
answer part carries labels. ``<image>`` in a prompt is expanded to the vision tower's patch count.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
IMAGE_TOKEN_NAME = "<image>"
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "\nASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_text(prompt: str) -> str:
    """The prompt half of the chat template (without BOS): ``USER: {prompt}\\nASSISTANT:``."""
    return f"{USER_PREFIX}{prompt}{ASSISTANT_PREFIX}"


def answer_text(answer: str, eos_token: str) -> str:
    """The answer half of the chat template: ``" {answer}{eos}"``."""
    return f" {answer}{eos_token}"


@lru_cache(maxsize=1)
def _tokenizer_config() -> dict[str, object]:
    return dict(json.loads((ASSETS_DIR / "tokenizer_config.json").read_text(encoding="utf-8")))


def load_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Load the committed byte-level BPE (``assets/tokenizer.json``) as a fast tokenizer."""
    path = ASSETS_DIR / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; rebuild it with `python -m fedmosaic_core.models.tokenizer_build`"
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), **_tokenizer_config())
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
