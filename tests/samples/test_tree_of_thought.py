"""tree_of_thought.py: a tree of forks sharing KV pages, thoughts scored by the model's logprobs."""

from __future__ import annotations

import itertools

import pytest

from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow

PROMPT = "Q: How do I sort a list of numbers? Let's think step by step."
DEPTH, BRANCHING, THOUGHT = 2, 3, 4
KV_PAGES = 48  # enough for the tree with shared pages, far too few for independent copies


def test_thoughts_are_exact_scored_and_share_the_prompt_pages(samples, pie_run, oracle):
    out = pie_run(samples["tree_of_thought"], "--prompt", PROMPT, "--depth", DEPTH, "--branching", BRANCHING,
                  "--thought-tokens", THOUGHT, options=("--kv-pages", KV_PAGES)).json()
    prompt = oracle.encode(PROMPT)
    assert out["prompt_tokens"] == prompt
    leaves = out["leaves"]
    assert [leaf["path"] for leaf in leaves] == [list(p) for p in itertools.product(range(BRANCHING), repeat=DEPTH)]

    for leaf in leaves:
        tokens = leaf["tokens"]
        assert len(tokens) == DEPTH * THOUGHT
        for level in range(DEPTH):
            before = prompt + tokens[:level * THOUGHT]
            thought = tokens[level * THOUGHT:(level + 1) * THOUGHT]
            # Child i starts with the i-th most likely token, then goes on greedily,
            # exactly as a fresh causal run over its own full sequence does.
            assert thought[0] == oracle.top(before, BRANCHING)[leaf["path"][level]]
            assert thought[1:] == oracle.greedy(before + thought[:1], THOUGHT - 1)
        # The score is the model's own log-probability of the path.
        assert leaf["logprob"] == pytest.approx(sum(oracle.logprobs(prompt, tokens)), abs=1e-3)
    assert out["best"] == max(leaves, key=lambda leaf: leaf["logprob"])["path"]
    assert len({tuple(leaf["tokens"]) for leaf in leaves}) == len(leaves)

    # Sharing: the leaves held far fewer distinct pages than copies would need,
    # and the run fit in a pool that independent copies could not fit in.
    independent = len(leaves) * -(-(len(prompt) + DEPTH * THOUGHT) // PAGE_SIZE)
    assert out["pages_if_copied"] == independent
    assert out["peak_pages"] < independent / 2
    assert KV_PAGES < independent
