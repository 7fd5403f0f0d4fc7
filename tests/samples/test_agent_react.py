"""agent_react.py: a ReAct loop whose tools run in the inferlet, keeping the KV cache across calls."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

HEADER = ("Answer the question. Use the tools calculator[EXPR] and lookup[KEY].\n"
          "Format: Thought: ... Action: tool[input] Observation: ... Final Answer: ...\n")
QUESTION = "What is the capital of France, and what is 6 times 7?"
ACTIONS = ["calculator[6 * (3 + 4)]", "lookup[capital of France]", "lookup[capital of Spain]"]
FACTS = "capital of France=Paris;capital of Italy=Rome"
THOUGHT_TOKENS, ANSWER_TOKENS = 5, 6


def test_tools_run_and_each_step_prefills_only_what_is_new(samples, pie_run, oracle):
    out = pie_run(samples["agent_react"], "--question", QUESTION, "--actions", "|".join(ACTIONS),
                  "--facts", FACTS, "--thought-tokens", THOUGHT_TOKENS, "--answer-tokens", ANSWER_TOKENS).json()
    steps = out["steps"]
    # The action lines were parsed and the tools ran: arithmetic and the key-value store.
    assert [s["action"] for s in steps] == ACTIONS
    assert [s["observation"] for s in steps] == ["42", "Paris", "unknown"]

    eos = oracle.tokenizer.eos_token_ids
    encode = oracle.encode
    sequence = encode(f"{HEADER}Question: {QUESTION}")
    in_kv = 0  # tokens the model has already run (the KV a continued context holds)

    def generation(record: dict, n: int) -> list:
        """Checks one generation against a cold greedy run over the whole sequence so far."""
        nonlocal in_kv, sequence
        assert record["context"] == len(sequence)
        assert record["prefilled"] == len(sequence) - in_kv  # only the new tokens
        expected = oracle.greedy(sequence, n, eos)
        drawn = [t for t in expected if t not in eos]
        sequence = sequence + drawn
        in_kv = len(sequence) - (0 if expected[-1] in eos else 1)  # the last draw is still pending
        return drawn

    for step in steps:
        sequence += encode("\nThought:")
        assert step["thought_tokens"] == generation(step, THOUGHT_TOKENS)
        sequence += encode(f"\nAction: {step['action']}") + encode(f"\nObservation: {step['observation']}")
    sequence += encode("\nFinal Answer:")
    assert out["answer_tokens"] == generation(out["final"], ANSWER_TOKENS)

    # The episode so far (the tool docs and question at least) was never run again.
    for record in steps[1:] + [out["final"]]:
        assert record["context"] - record["prefilled"] > len(encode(HEADER))
