"""Choice parsing (DRAKE's styles), answer extraction on tricky outputs, token F1, scoring."""

from __future__ import annotations

import pytest

from drake_data import (
    DrakeDataError,
    RenderedSample,
    extract_choice,
    parse_choices,
    score_sample,
    token_f1,
)


@pytest.mark.parametrize("question, expected", [
    ("<image>\nIs it?\nChoice list:[True, False]. Your answer is:", ["True", "False"]),
    ("<image>\nWhich? You must choose your answer from the Choice List.\nChoice list:[Image 1,Image 2,Image 3]. Your answer is: ",
     ["Image 1", "Image 2", "Image 3"]),
    ("Q\nChoice List: ['0', '1', '2']. Your answer is:", ["0", "1", "2"]),
    ("Q\nChoice list:['a, b', 'c']. Your answer is:", ["a, b", "c"]),
    ("Pick.\nChoice list:[A: a dog| B: a cat| C: <image>]. Answer with the option's letter from the given choices directly.",
     ["a dog", "a cat", "<image>"]),
    ("What is shown?\nA. a bird\nB. a plane\n(C) superman\nAnswer:", ["a bird", "a plane", "superman"]),
    ("Just a question without options?", None),
])
def test_parse_choices(question: str, expected: list[str] | None) -> None:
    assert parse_choices(question) == expected


@pytest.mark.parametrize("text, choices, expected", [
    ("red", ["red", "blue"], "red"),
    ("  Blue.  ", ["red", "blue"], "blue"),
    ("B", ["red", "blue"], "blue"),
    ("(b)", ["red", "blue"], "blue"),
    ("The answer is B.", ["red", "blue"], "blue"),
    ("Answer: red", ["red", "blue"], "red"),
    ("I think the shape is BLUE, clearly", ["red", "blue"], "blue"),
    ("A cat.", ["dog", "cat"], "cat"),  # the article "A" is not the letter A
    ("yes", ["True", "False"], "True"),
    ("No, they differ.", ["Yes", "No"], "No"),
    ("Nope", ["Yes", "No"], "No"),
    ("the second image", ["Image 1", "Image 2", "Image 3"], "Image 2"),
    ("3", ["Image 1", "Image 2", "Image 3"], "Image 3"),
    ("7", ["3", "7", "1", "9"], "7"),
    ("It is a red circle", ["red", "red circle", "blue circle"], "red circle"),
    ("C) giraffe because of the neck", ["bear", "cow", "giraffe"], "giraffe"),
    ("", ["red", "blue"], None),
    ("purple", ["red", "blue"], None),
    ("Z", ["red", "blue"], None),
])
def test_extract_choice(text: str, choices: list[str], expected: str | None) -> None:
    assert extract_choice(text, choices) == expected


def test_token_f1() -> None:
    assert token_f1("red circle", "red circle") == 1.0
    assert token_f1("The Red circle!", "red circle") == 1.0  # case, punctuation, articles
    assert token_f1("red", "red circle") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P=1, R=1/2
    assert token_f1("blue square", "red circle") == 0.0
    assert token_f1("red red red", "red circle") == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def _s(answer: str, choices: list[str] | None, task_type: str = "multi-choice") -> RenderedSample:
    return RenderedSample(id="s", prompt="Q", answer=answer, images=[], choices=choices, task_type=task_type)


def test_score_sample() -> None:
    assert score_sample("blue", _s("blue", ["red", "blue"])) == 1.0
    assert score_sample("A", _s("blue", ["red", "blue"])) == 0.0
    assert score_sample("the answer is b", _s("B", ["red", "blue"])) == 1.0  # letter-answered task
    assert score_sample("green circle", _s("red circle", None, "open-ended")) == pytest.approx(0.5)
    assert score_sample("Yes.", _s("yes", None)) == 1.0  # multi-choice without a choice list
    with pytest.raises(DrakeDataError, match="not one of the choices"):
        score_sample("red", _s("green", ["red", "blue"]))
    with pytest.raises(DrakeDataError, match="2 <image> tokens for 0 images"):
        RenderedSample(id="x", prompt="<image><image>", answer="a", images=[], choices=None, task_type="open-ended")
