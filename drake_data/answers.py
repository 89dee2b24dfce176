"""Scoring generated text: map it to one of the choices (accuracy) or token F1 (open-ended).

``extract_choice`` tries, in order: the whole answer equals an option; a bare letter
(``B``, ``(B)``, ``B.``); a phrase after "answer is"/"answer:"; yes/no/true/false synonyms;
"Image k" options from ordinals or numbers; an option mentioned as whole words (longest
options first, earliest mention wins); a leading ``B.``/``B)`` letter.
``token_f1`` is SQuAD's: F1 = 2PR/(P+R) over multisets of normalised tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from drake_data.errors import DrakeDataError

if TYPE_CHECKING:
    from drake_data.prompts import RenderedSample

LETTERS = "ABCDEFGHIJ"
_PUNCT_EDGES = string.punctuation + " \t\n\"'“”‘’«»"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_LEAD = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+)?answer\s*(?:is|:)\s*[:\-]?\s*(.+)", re.I | re.S)
_BARE_LETTER = re.compile(r"^\(?\s*([A-Ja-j])\s*\)?[.:)]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-J])[.:)]\s*", re.S)
_OPTION_IMAGE = re.compile(r"^(?:image|picture|img)\s*#?\s*(\d+)$")
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
             "seventh": 7, "eighth": 8, "1st": 1, "2nd": 2, "3rd": 3, "4th": 4, "5th": 5,
             "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "left": 1}
_YES = {"yes", "true", "correct", "right", "yeah", "yep", "positive", "same"}
_NO = {"no", "false", "incorrect", "wrong", "nope", "negative", "not", "different"}


def normalise(text: str) -> str:
    """Lower case, inner whitespace collapsed, punctuation and quotes trimmed at both ends."""
    return " ".join(text.lower().split()).strip(_PUNCT_EDGES)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _find_phrase(haystack: list[str], needle: list[str]) -> int:
    """First index where ``needle`` occurs as consecutive words in ``haystack`` (−1 if absent)."""
    n = len(needle)
    if n == 0:
        return -1
    for i in range(len(haystack) - n + 1):
        if haystack[i:i + n] == needle:
            return i
    return -1


def _polarity(word_set: set[str]) -> str | None:
    return "yes" if word_set & _YES else ("no" if word_set & _NO else None)


def _match(text: str, choices: Sequence[str], depth: int = 0) -> int | None:
    norm = normalise(text)
    if not norm:
        return None
    normed = [normalise(c) for c in choices]
    # 1. the whole answer is an option
    if norm in normed:
        return normed.index(norm)
    # 2. a bare letter
    m = _BARE_LETTER.match(text.strip())
    if m and (k := LETTERS.index(m.group(1).upper())) < len(choices):
        if m.group(1).isupper() or len(text.strip()) > 1 or not any(len(c) == 1 for c in normed):
            return k
    # 3. "the answer is X"
    lead = _ANSWER_LEAD.search(text)
    if lead and depth == 0:
        inner = lead.group(1).strip().split("\n")[0]
        k2 = _match(inner, choices, depth + 1)
        if k2 is not None:
            return k2
    words = _words(text)
    # 4. "Image k" options from numbers / ordinals
    image_numbers = [_OPTION_IMAGE.match(c) for c in normed]
    if all(image_numbers):
        nums = [int(im.group(1)) for im in image_numbers if im]
        for w in words:
            val = int(w) if w.isdigit() else _ORDINALS.get(w)
            if val is not None and val in nums:
                return nums.index(val)
    # 5. options mentioned as whole words: longest first, earliest mention wins
    hits: list[tuple[int, int, int]] = []  # (position, -length, index)
    for k, c in enumerate(normed):
        pos = _find_phrase(words, _words(c))
        if pos >= 0:
            hits.append((pos, -len(_words(c)), k))
    if hits:
        # drop options contained in a longer option that also matched at the same place
        hits.sort()
        return hits[0][2]
    # 6. yes/no synonyms for yes/no-like options
    polar = [_polarity(set(_words(c))) if len(_words(c)) == 1 else None for c in normed]
    if "yes" in polar and "no" in polar:
        first = next((p for p in (_polarity({w}) for w in words) if p), None)
        if first is not None:
            return polar.index(first)
    # 7. a leading letter with punctuation: "B) because ..."
    lm = _LEADING_LETTER.match(text.strip())
    if lm and (k := LETTERS.index(lm.group(1))) < len(choices):
        return k
    return None


def chosen_index(text: str, choices: Sequence[str]) -> int | None:
    """Index of the option that ``text`` selects, or ``None`` when it names none (unparsable)."""
    return _match(text, choices) if choices else None


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The option that ``text`` selects (an element of ``choices``), or ``None``."""
    if not choices:
        return None
    k = _match(text, choices)
    return None if k is None else choices[k]


def answer_index(answer: str, choices: Sequence[str]) -> int | None:
    """Index of a gold answer among ``choices``: exact option, a letter, or a looser mention."""
    normed = [normalise(c) for c in choices]
    a = normalise(answer)
    if a in normed:
        return normed.index(a)
    if len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[: len(choices)]:
        return LETTERS.index(answer.strip().upper())
    return _match(answer, choices)


def _f1_tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch if ch not in string.punctuation else " " for ch in text)
    text = _ARTICLES.sub(" ", text)
    return text.split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token F1 ∈ [0, 1]: P = |pred ∩ ref| / |pred|, R = |pred ∩ ref| / |ref|, F1 = 2PR/(P+R)
    (multiset intersection; lower case, punctuation and articles removed; both empty → 1)."""
    p, r = _f1_tokens(pred), _f1_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def gold_index(sample: RenderedSample) -> int:
    """Index of a multi-choice sample's gold answer among its choices (clear error if absent)."""
    gold = answer_index(sample.answer, sample.choices or [])
    if gold is None:
        raise DrakeDataError(
            f"record id={sample.id!r}: gold answer {sample.answer!r} is not one of the choices {sample.choices}"
        )
    return gold


def score_sample(generated: str, sample: RenderedSample) -> float:
    """1/0 for a multi-choice sample (the chosen option is the gold one), token F1 for open-ended.

    A multi-choice sample without a parsable choice list is scored by normalised exact match.
    """
    if sample.task_type == "open-ended":
        return token_f1(generated, sample.answer)
    if not sample.choices:
        return float(normalise(generated) == normalise(sample.answer))
    return float(_match(generated, sample.choices) == gold_index(sample))
