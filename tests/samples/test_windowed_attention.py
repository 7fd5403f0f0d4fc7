"""windowed_attention.py: per-pass band masks and dropped pages, bounded memory, exact window semantics."""

from __future__ import annotations

import json

import pytest

from tests.samples.conftest import run_instance
from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
WINDOW, MAX_TOKENS = 12, 32


def test_attention_is_the_window_and_pages_stay_bounded(samples, server, oracle):
    outcome = run_instance(server, samples["windowed_attention"], "--prompt", PROMPT, "--window", WINDOW,
                           "--max-tokens", MAX_TOKENS)
    out = json.loads(outcome.value)
    prompt = oracle.encode(PROMPT)
    assert len(prompt) <= WINDOW  # the prefill is plainly causal; the window bites while decoding
    assert len(out["tokens"]) == MAX_TOKENS

    def visible(i: int, j: int) -> bool:
        return j > i - WINDOW  # the window ends at the token itself

    assert out["tokens"] == oracle.greedy_visible(prompt, MAX_TOKENS, visible)
    assert out["tokens"] != oracle.greedy(prompt, MAX_TOKENS)  # the window changed the text

    # Memory, as the server counts it.
    bound = -(-WINDOW // PAGE_SIZE) + 1
    assert 0 < outcome.kv_pages_peak <= bound < (len(prompt) + MAX_TOKENS) // PAGE_SIZE
