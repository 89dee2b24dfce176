"""Multiple choice by option likelihood: hand-built logits, the model's own loss, the client's scorer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from test_models_standin import standin_public_samples

from client_app.evaluation import score_samples
from drake_data.prompts import RenderedSample
from fedmosaic_core.models import collate, load_model
from fedmosaic_core.models.collate import IGNORE_INDEX
from fedmosaic_core.models.scoring import (
    answer_log_likelihoods,
    choose_options,
    option_log_likelihoods,
    ranked_choice,
)


def test_answer_log_likelihood_on_hand_built_logits() -> None:
    vocab = 5
    # Two rows: prompt tokens, then a 2-token answer at positions 2 and 3.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, 4, 1]])
    logits = torch.zeros(2, 4, vocab)
    # position t predicts token t+1: make token 3 then 1 certain for row 0, token 4 unlikely for row 1
    logits[0, 1, 3] = 10.0
    logits[0, 2, 1] = 10.0
    logits[1, 1, 4] = -10.0
    logits[1, 2, 1] = 10.0
    got = answer_log_likelihoods(logits, labels)
    log_z = lambda row: torch.logsumexp(row, 0)  # noqa: E731
    want0 = (logits[0, 1, 3] - log_z(logits[0, 1])) + (logits[0, 2, 1] - log_z(logits[0, 2]))
    want1 = (logits[1, 1, 4] - log_z(logits[1, 1])) + (logits[1, 2, 1] - log_z(logits[1, 2]))
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-6)
    assert ranked_choice(got.tolist()) == 0
    assert ranked_choice([-3.0, -1.0, -2.0]) == 1
    with pytest.raises(ValueError, match="no options"):
        ranked_choice([])


@dataclass
class Sample:
    id: str
    prompt: str
    answer: str
    images: list[Any]


class FixedLogits(torch.nn.Module):
    """A stand-in LM whose next-token distribution depends only on the previous token: it makes
    ``favoured`` the most likely token after every token, so the option spelled by it wins."""

    def __init__(self, vocab: int, favoured: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.favoured = vocab, favoured

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 5.0
        return type("Out", (), {"logits": logits})()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        """Greedy decoding under these logits: ``favoured`` every step."""
        new = torch.full((input_ids.shape[0], max_new_tokens), self.favoured, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)


def test_choose_options_picks_the_option_the_logits_favour() -> None:
    loaded = load_model("tiny-llama-s", random_init=True)
    tok = loaded.tokenizer
    options = ["red", "blue", "green"]
    for k, option in enumerate(options):
        ids = tok.encode(" " + option, add_special_tokens=False)
        assert len(ids) == 1, "the test needs one-token options"
        model = FixedLogits(len(tok), ids[0])
        picks = choose_options(model, tok, [Sample("q", "What colour?", "", [])], [options], 64)
        assert picks == [k]


def test_option_log_likelihood_equals_the_models_answer_loss() -> None:
    torch.manual_seed(0)
    loaded = load_model("tiny-llama-s", random_init=True)
    samples = standin_public_samples(3, seed=2)
    options = [[s.answer, "something else"] for s in samples]
    got = option_log_likelihoods(loaded.model, loaded.processor, samples, options, 256)
    for sample, scores in zip(samples, got, strict=True):
        batch = collate(loaded.processor, [sample], 256)
        with torch.no_grad():
            loss = loaded.model(**batch).loss  # mean CE over the answer tokens + eos
        n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert math.isclose(scores[0], -float(loss) * n_tokens, rel_tol=1e-4)


def test_client_scorer_counts_likelihood_and_generation_with_unparsable() -> None:
    loaded = load_model("tiny-llama-s", random_init=True)
    tok = loaded.tokenizer
    options = ["red", "blue"]
    samples = [RenderedSample(f"s{i}", "Which colour? Choice list:[red, blue]. Your answer is:", options[i % 2], [],
                              options, "multi-choice") for i in range(4)]
    favour_blue = FixedLogits(len(tok), tok.encode(" blue", add_special_tokens=False)[0])
    liked = score_samples(favour_blue, tok, samples, scoring="likelihood", max_length=64, max_new_tokens=3)
    assert (liked.score, liked.samples, liked.choice_samples, liked.unparsable) == (0.5, 4, 4, 0)
    favour_eos = FixedLogits(len(tok), tok.eos_token_id)  # generates "" — names no option
    generated = score_samples(favour_eos, tok, samples, scoring="generation", max_length=64, max_new_tokens=3)
    assert (generated.score, generated.unparsable) == (0.0, 4)


@pytest.mark.parametrize("preset", ["tiny-llama-s", "tiny-qwen2-s"])
def test_answer_positions_only_equal_the_full_forward(preset: str) -> None:
    """The head applied to answer positions only gives the full forward's logits and loss there,
    also through a PQ-LoRA model with learned gates, which pool over each prompt in both paths."""
    from fedmosaic_core.models.scoring import answer_loss_mean, answer_token_logits
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

    torch.manual_seed(0)
    loaded = load_model(preset, random_init=True)
    model = inject_pqlora(loaded.model, PQLoRAConfig(r=4, alpha=8, dropout=0.0, gate_noise=False, seed=0))
    for p in model.parameter_groups()["pq"] + model.parameter_groups()["gate"]:
        torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter and input-dependent gates
    model.eval()
    batch = collate(loaded.processor, standin_public_samples(4, seed=3), 256)
    with torch.no_grad():
        logits, targets, rows = answer_token_logits(model, batch)  # first: no mask left by a forward
        full = model(**batch)
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        assert torch.allclose(logits, full.logits[:, :-1][keep].float(), atol=1e-5)
        assert torch.equal(targets, batch["labels"][:, 1:][keep])
        assert rows.tolist() == [r for r in range(4) for _ in range(int(keep[r].sum()))]
        assert torch.allclose(answer_loss_mean(model, batch), full.loss, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-llama-s", "tiny-qwen2-s"])
def test_shared_prompt_option_scores_equal_one_full_forward_per_option(preset: str) -> None:
    """Scoring each prompt once and its options from the repeated cache gives the log-likelihood
    of a full forward of every (prompt, option) row: mixed image counts, options of different
    token lengths, a PQ-LoRA model with input-dependent gates that keep each prompt's β."""
    from fedmosaic_core.models.scoring import _one_row_per_option, _prompt_then_options
    from fedmosaic_core.pqlora import PQLoRAConfig, inject_pqlora

    torch.manual_seed(0)
    loaded = load_model(preset, random_init=True)
    model = inject_pqlora(loaded.model, PQLoRAConfig(r=4, alpha=8, dropout=0.0, gate_noise=False, seed=0))
    for p in model.parameter_groups()["pq"] + model.parameter_groups()["gate"]:
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    samples = standin_public_samples(10, seed=5)
    choices = [[s.answer, "a much longer wrong option", "no"][: 2 + i % 2] for i, s in enumerate(samples)]
    shared = _prompt_then_options(model, loaded.processor, samples, choices, 256)
    per_row = _one_row_per_option(model, loaded.processor, samples, choices, 256)
    for got, want in zip(shared, per_row, strict=True):
        assert len(got) == len(want)
        assert all(math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-4) for g, w in zip(got, want, strict=True)), (got, want)
    # different gates per prompt: the kept β is per prompt, not one for the batch
    betas = model.adapted_modules[0].adapter._decoding_beta
    assert betas is not None and betas.unique().numel() > 1
    assert option_log_likelihoods(model, loaded.processor, samples, choices, 256) == shared


def test_generation_stops_at_every_stop_token_of_the_model() -> None:
    """A model with several stop ids in its generation config (as Llama-3-Instruct has) stops at
    any of them, not only at the tokenizer's eos."""
    from fedmosaic_core.models.collate import generate_answers, stop_token_ids

    loaded = load_model("tiny-llama-s", random_init=True)
    tok = loaded.tokenizer
    stop = tok.encode(" stop", add_special_tokens=False)[-1]
    loaded.model.generation_config.eos_token_id = tok.eos_token_id
    assert stop_token_ids(loaded.model, tok) == [tok.eos_token_id]
    loaded.model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert stop_token_ids(loaded.model, tok) == [tok.eos_token_id, stop]

    def always_stop(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., stop] += 1e4
        return logits

    handle = loaded.model.lm_head.register_forward_hook(always_stop)
    try:
        sample = Sample("q", "What now?", "", [])
        answers = generate_answers(loaded.model, loaded.processor, [sample], max_new_tokens=5, max_length=64)
    finally:
        handle.remove()
    assert answers == [tok.decode([stop]).strip()]  # one token, not five
