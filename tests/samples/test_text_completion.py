"""The main job end to end: text_completion.py built by pie-build, run by pie-run.

The inferlet's greedy completion must equal the engine's native batched loop
(engine_jax.generate) for the same prompt, token for token, and 32 concurrent
instances must each produce that same completion while the serving core
batches their forwards together.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine_jax.engine import Engine
from engine_jax.generate import generate
from pie_runtime.messaging import frame_line
from tests.helpers.engine_models import load_test_model
from tests.samples.conftest import build_and_precompile
from tests.samples.oracle import PAGE_SIZE

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def text_completion(samples_pie_home: None) -> Path:
    return build_and_precompile("text_completion")


@pytest.fixture(scope="module")
def native_completion(sample_model_dir: Path):
    """The engine's own greedy loop: no Wasm, no runtime, no SDK."""
    model = load_test_model(sample_model_dir)
    engine = Engine(model, page_size=PAGE_SIZE, num_pages=128)
    tok = model.tokenizer

    def complete(prompt: str) -> str:
        ids = tok.encode(prompt)
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
        out = generate(engine, [ids], MAX_TOKENS, stop_token_ids=tuple(tok.eos_token_ids))[0]
        if out and out[-1] in tok.eos_token_ids:
            out = out[:-1]
        return tok.decode(out)

    return complete


DECODE_MODES = {
    "run-of-8": ("--queue-ahead", "off", "--decode-run", "8"),  # forward-run (the default on a CPU)
    "per-token": ("--queue-ahead", "off", "--decode-run", "1"),  # forward-wait
    "queue-ahead": ("--queue-ahead", "on"),  # runs of 8, each queued one ahead (the default on accelerators)
}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("mode", DECODE_MODES)
def test_greedy_completion_equals_the_native_loop(text_completion, pie_run, native_completion, prompt, mode):
    """Whichever way the SDK hands its passes over (tests/runtime/test_host_cli.py
    covers stopping early in each)."""
    run = pie_run(text_completion, "--prompt", prompt, "--max-tokens", MAX_TOKENS, options=DECODE_MODES[mode])
    assert run.result == frame_line(native_completion(prompt))


def test_prompts_give_different_completions(text_completion, pie_run):
    # Guards the equality test above: a model or path that ignored the prompt
    # would give one completion for every prompt.
    results = {pie_run(text_completion, "--prompt", p, "--max-tokens", MAX_TOKENS).result for p in PROMPTS}
    assert len(results) == len(PROMPTS)


def test_32_concurrent_instances_match_single_runs_and_share_engine_steps(
        text_completion, pie_run, native_completion):
    prompt = PROMPTS[0]
    run = pie_run(text_completion, "--prompt", prompt, "--max-tokens", MAX_TOKENS, options=("--instances", "32", "--kv-pages", "512"))
    results = {}
    for line in [*run.messages, run.result]:
        match = re.fullmatch(r"\[(\d+)\] (.*)", line)
        if match:
            results[int(match.group(1))] = match.group(2)
    assert len(results) == 32, run.stderr
    expected = frame_line(native_completion(prompt))
    assert all(value == expected for value in results.values()), results
    assert "32/32 instances ok" in run.stderr
    largest = int(re.search(r"max (\d+)", run.stderr).group(1))
    assert largest > 1, run.stderr
