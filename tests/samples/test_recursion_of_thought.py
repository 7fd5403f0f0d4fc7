"""recursion_of_thought.py: subproblems solved recursively in their own contexts, concurrently."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

PROBLEM = "Plan a three-day trip to Rome."
DEPTH, BRANCHING, SUB_TOKENS, ANSWER_TOKENS = 2, 2, 3, 4


def test_every_node_is_exact_and_siblings_are_batched(samples, pie_run, oracle):
    run = pie_run(samples["recursion_of_thought"], "--problem", PROBLEM, "--depth", DEPTH,
                  "--branching", BRANCHING, "--sub-tokens", SUB_TOKENS, "--answer-tokens", ANSWER_TOKENS)
    root = run.json()
    eos = oracle.tokenizer.eos_token_ids
    encode = oracle.encode

    def greedy(prefix: list, n: int) -> list:
        return [t for t in oracle.greedy(prefix, n, eos) if t not in eos]

    nodes = 0

    def check(node: dict, depth: int) -> None:
        """A node's context holds only its own problem, subproblems and their answers."""
        nonlocal nodes
        nodes += 1
        sequence = encode("Problem:") + node["problem"]
        assert len(node["subproblems"]) == (BRANCHING if depth else 0)
        if depth:
            sequence += encode("\nSubproblems:")
            for i, sub in enumerate(node["subproblems"], start=1):
                sequence += encode(f"\n{i}.")
                assert sub["problem"] == greedy(sequence, SUB_TOKENS)
                sequence += sub["problem"]
            for i, sub in enumerate(node["subproblems"], start=1):
                check(sub, depth - 1)
                sequence += encode(f"\nAnswer {i}:") + sub["answer"]
        sequence += encode("\nAnswer:")
        assert node["answer"] == greedy(sequence, ANSWER_TOKENS)

    assert root["problem"] == encode(PROBLEM)
    check(root, DEPTH)
    assert nodes == sum(BRANCHING ** d for d in range(DEPTH + 1))

    sizes = re.search(r"batch sizes \(requests x steps\): .*; mean [\d.]+, max (\d+)", run.stderr)
    assert sizes and int(sizes.group(1)) >= 2  # siblings' passes shared engine steps
