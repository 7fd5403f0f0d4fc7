"""beam_search.py: beams are forks of one context, scored by summed log-probabilities."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
MAX_TOKENS = 5


def test_width_one_is_greedy(samples, pie_run, oracle):
    (beam,) = pie_run(samples["beam_search"], "--prompt", PROMPT, "--width", 1, "--max-tokens", MAX_TOKENS).json()
    eos = oracle.tokenizer.eos_token_ids
    assert beam["tokens"] == oracle.greedy(oracle.encode(PROMPT), MAX_TOKENS, eos)


def test_beams_are_sorted_and_their_scores_are_the_summed_logprobs(samples, pie_run, oracle):
    width = 3
    beams = pie_run(samples["beam_search"], "--prompt", PROMPT, "--width", width, "--max-tokens", MAX_TOKENS).json()
    assert len(beams) == width
    assert len({tuple(b["tokens"]) for b in beams}) == width  # distinct continuations
    scores = [b["logprob"] for b in beams]
    assert scores == sorted(scores, reverse=True)
    prompt = oracle.encode(PROMPT)
    for beam in beams:
        assert beam["tokens"], beam
        recomputed = sum(oracle.logprobs(prompt, beam["tokens"]))
        assert beam["logprob"] == pytest.approx(recomputed, abs=1e-3)
