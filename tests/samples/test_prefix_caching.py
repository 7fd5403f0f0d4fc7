"""prefix_caching.py: a later run imports the exported system-prompt KV instead of prefilling it."""

from __future__ import annotations

import json

import pytest

from tests.samples.conftest import run_on
from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly, cite your sources and never guess."
PROMPT = "What is a KV cache?"
MAX_TOKENS = 6




def test_second_run_imports_the_prefix_and_matches_the_cold_run(samples, server, oracle):
    args = (f"--system={SYSTEM}", f"--prompt={PROMPT}", f"--max-tokens={MAX_TOKENS}")
    cold = run_on(server, samples["prefix_caching"], *args)
    warm = run_on(server, samples["prefix_caching"], *args)

    system, prompt = oracle.encode(SYSTEM), oracle.encode(PROMPT)
    assert len(system) % PAGE_SIZE  # a shared partial page: the importer must copy it, not write it
    assert (cold["cached"], cold["saved"]) == (False, 0)
    assert (warm["cached"], warm["saved"]) == (True, len(system))
    assert cold["prefilled"] == warm["prefilled"] == len(prompt)
    expected = [t for t in oracle.greedy(system + prompt, MAX_TOKENS, oracle.tokenizer.eos_token_ids)
                if t not in oracle.tokenizer.eos_token_ids]
    assert cold["tokens"] == warm["tokens"] == expected

    # The export survived both writers intact: a third run with another prompt is still exact.
    other = run_on(server, samples["prefix_caching"], f"--system={SYSTEM}", "--prompt=Why?",
                 f"--max-tokens={MAX_TOKENS}")
    assert other["cached"]
    assert other["tokens"] == [t for t in oracle.greedy(system + oracle.encode("Why?"), MAX_TOKENS,
                                                        oracle.tokenizer.eos_token_ids)
                               if t not in oracle.tokenizer.eos_token_ids]


def test_concurrent_first_runs_both_succeed(samples, pie_run):
    """Two instances racing to publish the same prefix: one exports, neither fails."""
    run = pie_run(samples["prefix_caching"], "--system", SYSTEM, "--prompt", PROMPT,
                  "--max-tokens", MAX_TOKENS, options=("--instances", 2))
    lines = run.messages + [run.result]
    assert sorted(line[:4] for line in lines) == ["[0] ", "[1] "]
    first, second = (json.loads(line[4:]) for line in lines)
    assert first["tokens"] == second["tokens"]
