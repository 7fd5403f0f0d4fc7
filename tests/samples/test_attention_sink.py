"""attention_sink.py: sink + sliding window with masked and dropped pages, bounded memory."""

from __future__ import annotations

import json

import pytest

from tests.samples.conftest import run_instance
from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
SINK, WINDOW, MAX_TOKENS = 4, 8, 40


def test_pages_stay_bounded_and_attention_is_sink_plus_window(samples, server, oracle):
    outcome = run_instance(server, samples["attention_sink"], "--prompt", PROMPT, "--sink", SINK,
                           "--window", WINDOW, "--max-tokens", MAX_TOKENS)
    out = json.loads(outcome.value)
    prompt = oracle.encode(PROMPT)
    assert len(out["tokens"]) == MAX_TOKENS  # ran far past the window

    # Memory, as the server counts it: the sink's pages, the window's
    # (unaligned: one more), and the page the newest token lands in, however
    # long the generation.
    bound = -(-SINK // PAGE_SIZE) + -(-WINDOW // PAGE_SIZE) + 2
    assert 0 < outcome.kv_pages_peak <= bound
    assert (len(prompt) + MAX_TOKENS) // PAGE_SIZE > bound  # without eviction it would not fit
    assert out["kv_len"] <= bound * PAGE_SIZE

    # Semantics: each generated token saw exactly the sink and the window (its
    # own KV included), at its original RoPE position: the same tokens as a
    # full KV cache with that attention mask, computed independently.
    def visible(i: int, j: int) -> bool:
        return j < SINK or j >= i - WINDOW

    assert out["tokens"] == oracle.greedy_visible(prompt, MAX_TOKENS, visible)
    # ... and the eviction mattered: full attention gives another text.
    assert out["tokens"] != oracle.greedy(prompt, MAX_TOKENS)
