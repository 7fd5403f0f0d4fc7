"""graph_of_thought.py: parallel thoughts scored by their logprobs, the best merged by a join node."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

PROMPT = "Q: Name ways to reduce memory use. Ideas:"
N, KEEP, THOUGHT, MERGE = 3, 2, 4, 6


def test_thoughts_scores_and_merge_are_exact(samples, pie_run, oracle):
    out = pie_run(samples["graph_of_thought"], "--prompt", PROMPT, "--n", N, "--keep", KEEP,
                  "--thought-tokens", THOUGHT, "--merge-tokens", MERGE).json()
    prompt = oracle.encode(PROMPT)
    assert out["prompt_tokens"] == prompt
    thoughts = out["thoughts"]
    # Thought i starts with the i-th most likely token and goes on greedily.
    assert [t["tokens"][0] for t in thoughts] == oracle.top(prompt, N)
    for t in thoughts:
        assert t["tokens"][1:] == oracle.greedy(prompt + t["tokens"][:1], THOUGHT - 1)
        assert t["score"] == pytest.approx(sum(oracle.logprobs(prompt, t["tokens"])) / THOUGHT, abs=1e-3)
    assert out["kept"] == sorted(range(N), key=lambda i: thoughts[i]["score"], reverse=True)[:KEEP]

    # The join node: the prompt, the kept thoughts in rank order, then its own greedy text.
    sequence = list(prompt)
    for rank, i in enumerate(out["kept"], start=1):
        sequence += oracle.encode(f"\nIdea {rank}:") + thoughts[i]["tokens"]
    sequence += oracle.encode("\nCombined:")
    eos = oracle.tokenizer.eos_token_ids
    assert out["merged"]["tokens"] == [t for t in oracle.greedy(sequence, MERGE, eos) if t not in eos]
