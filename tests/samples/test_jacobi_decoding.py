"""jacobi_decoding.py: blocks of guesses fixed in place, exactly greedy, fewer passes than tokens."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "x y z x y w x y z x y w x y"
MAX_TOKENS, BLOCK = 24, 4


def test_output_equals_greedy_in_fewer_passes(samples, pie_run, oracle):
    out = pie_run(samples["jacobi_decoding"], "--prompt", PROMPT, "--max-tokens", MAX_TOKENS,
                  "--block", BLOCK).json()
    eos = oracle.tokenizer.eos_token_ids
    expected = oracle.greedy(oracle.encode(PROMPT), MAX_TOKENS, eos)
    assert out["tokens"] == expected
    # Every pass yields one token of its own plus its accepted guesses (the last
    # pass may yield more than max-tokens lets through).
    assert out["passes"] + out["accepted"] >= len(expected)
    assert out["passes"] + out["accepted"] - len(expected) <= BLOCK
    assert out["accepted"] > 0 and out["passes"] < len(expected)
