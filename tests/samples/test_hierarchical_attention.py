"""hierarchical_attention.py: sections prefilled together, each seeing only the title and itself."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow

TITLE = "Notes on Python."
SECTIONS = [" Lists are mutable and keep their order.", " Tuples are not."]
MAX_TOKENS = 6


def test_each_section_equals_its_own_prefill_and_the_title_runs_once(samples, pie_run, oracle):
    run = pie_run(samples["hierarchical_attention"], "--title", TITLE, "--sections", "|".join(SECTIONS),
                  "--max-tokens", MAX_TOKENS)
    out = run.json()
    eos = oracle.tokenizer.eos_token_ids
    title = oracle.encode(TITLE)
    sections = [oracle.encode(s) for s in SECTIONS]

    # Each continuation (its first token from the shared pass) is what a
    # separate prefill of title + that section alone gives.
    for tokens, got in zip(sections, out["sections"]):
        assert got["tokens"] == [t for t in oracle.greedy(title + tokens, MAX_TOKENS, eos) if t not in eos]
    # The mask mattered: with plain causal attention the second section would see the first.
    assert out["sections"][1]["tokens"] != oracle.greedy(title + sections[0] + sections[1], MAX_TOKENS)

    # The title went through the model once: the engine processed the whole
    # document once plus each continuation's tokens, not title + section per branch.
    processed = int(re.search(r"(\d+) processed in \d+ engine steps", run.stderr).group(1))
    continued = sum(len(s["tokens"]) - 1 for s in out["sections"])
    assert processed == len(title) + sum(map(len, sections)) + continued
