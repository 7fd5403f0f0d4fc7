"""output_validation.py: candidates scored by forks in one pass each, ranked by log-probability."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CANDIDATES = [" Paris", " London is big", " Berlin", " a city of light"]


def test_ranking_equals_ranking_by_independent_logprobs(samples, pie_run, oracle):
    ranked = pie_run(samples["output_validation"], "--prompt", PROMPT, "--candidates", "|".join(CANDIDATES)).json()
    prompt = oracle.encode(PROMPT)
    expected = {c: sum(oracle.logprobs(prompt, oracle.encode(c))) for c in CANDIDATES}
    assert [r["candidate"] for r in ranked] == sorted(CANDIDATES, key=expected.get, reverse=True)
    for r in ranked:
        assert r["tokens"] == oracle.encode(r["candidate"])
        assert r["logprob"] == pytest.approx(expected[r["candidate"]], abs=1e-3)
    # Not a fixed order of the arguments: the scores really differ.
    assert len({round(r["logprob"], 3) for r in ranked}) == len(CANDIDATES)
