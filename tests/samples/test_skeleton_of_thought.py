"""skeleton_of_thought.py: a skeleton, then its points expanded by forks batched together."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

QUESTION = "How do I make my code faster?"
POINTS, SKELETON_TOKENS, POINT_TOKENS = 3, 4, 6


def test_expansions_are_exact_and_share_engine_steps(samples, pie_run, oracle):
    run = pie_run(samples["skeleton_of_thought"], "--question", QUESTION, "--points", POINTS,
                  "--skeleton-tokens", SKELETON_TOKENS, "--point-tokens", POINT_TOKENS)
    out = run.json()
    eos = oracle.tokenizer.eos_token_ids

    def greedy(prefix: list, n: int) -> list:
        return [t for t in oracle.greedy(prefix, n, eos) if t not in eos]

    # The skeleton, rebuilt independently: each point continues all before it.
    sequence = oracle.encode(f"Question: {QUESTION}\nSkeleton:")
    for i, point in enumerate(out["skeleton"], start=1):
        sequence += oracle.encode(f"\n{i}.")
        expected = greedy(sequence, SKELETON_TOKENS)
        assert point["tokens"] == expected
        sequence += expected
    sequence += oracle.encode("\nExpansion:")

    # Each expansion: a fork of the skeleton, exactly a fresh run over its sequence.
    assert len(out["points"]) == POINTS
    for i, point in enumerate(out["points"], start=1):
        assert point["tokens"] == greedy(sequence + oracle.encode(f"\nPoint {i}:"), POINT_TOKENS)
    assert len({tuple(p["tokens"]) for p in out["points"]}) > 1  # they depend on their point

    # The forks' forward passes were batched: some engine steps ran several requests.
    sizes = re.search(r"batch sizes \(requests x steps\): .*; mean [\d.]+, max (\d+)", run.stderr)
    assert sizes, run.stderr
    assert int(sizes.group(1)) >= 2
