"""speculative_decoding.py: n-gram drafts verified as a tree in one pass, exactly greedy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# Repetitive with two different continuations of "x y": the drafter finds
# matches, and the tree's second branch wins some passes (its KV is moved).
PROMPT = "x y z x y w x y z x y w x y"
MAX_TOKENS = 32


def test_output_equals_greedy_and_drafts_are_accepted(samples, pie_run, oracle):
    out = pie_run(samples["speculative_decoding"], "--prompt", PROMPT, "--max-tokens", MAX_TOKENS).json()
    eos = oracle.tokenizer.eos_token_ids
    expected = oracle.greedy(oracle.encode(PROMPT), MAX_TOKENS, eos)
    assert out["tokens"] == expected
    assert out["accepted"] > 0 and 0 < out["acceptance_rate"] <= 1
    assert out["acceptance_rate"] == pytest.approx(out["accepted"] / out["drafted"])
    # Every pass yields its accepted drafts plus the model's own token: the
    # accepted drafts really replaced forward passes.
    if expected[-1] not in eos:
        assert len(out["tokens"]) == out["passes"] + out["accepted"]
    assert out["passes"] < len(out["tokens"])
    assert out["later_branch"] > 0  # the KV of a non-first branch was moved into place, still exact
