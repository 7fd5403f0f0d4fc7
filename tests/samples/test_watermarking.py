"""watermarking.py: green-list sampling leaves a watermark that the detector finds, and only there."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The history of the city"
MAX_TOKENS = 48
KEY, GAMMA = 15485863, 0.25
_MASK = (1 << 64) - 1


def is_green(previous: int, token: int) -> bool:
    """The documented green-list rule, reimplemented: the detector must agree with it."""
    z = (KEY * 0x9E3779B97F4A7C15 + previous * 0xBF58476D1CE4E5B9 + token * 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) < GAMMA * 2.0 ** 64


def z_score(tokens: list) -> float:
    n = len(tokens) - 1
    green = sum(is_green(a, b) for a, b in zip(tokens, tokens[1:]))
    return (green - GAMMA * n) / math.sqrt(n * GAMMA * (1 - GAMMA))


def test_watermarked_text_scores_high_and_plain_text_low(samples, pie_run, oracle):
    wasm = samples["watermarking"]
    marked = pie_run(wasm, "--prompt", PROMPT, "--max-tokens", MAX_TOKENS, "--key", KEY, "--gamma", GAMMA).json()
    assert len(marked["tokens"]) > 24
    assert marked["z"] == pytest.approx(z_score(marked["tokens"]))
    assert marked["z"] > 4

    ids = ",".join(map(str, marked["tokens"]))
    detected = pie_run(wasm, "--detect-tokens", ids, "--key", KEY, "--gamma", GAMMA).json()
    assert detected["z"] == pytest.approx(marked["z"])  # from the tokens alone, no generation state

    # The same model without the watermark: greedy text has no green bias.
    eos = oracle.tokenizer.eos_token_ids
    plain = [t for t in oracle.greedy(oracle.encode(PROMPT), MAX_TOKENS, eos) if t not in eos]
    text = oracle.tokenizer.decode(plain)
    clean = pie_run(wasm, "--detect", text, "--key", KEY, "--gamma", GAMMA).json()
    assert clean["z"] < 2
    assert clean["z"] == pytest.approx(z_score(oracle.encode(text)))
