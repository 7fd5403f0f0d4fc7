"""prefix_caching.py: a later run imports the exported system-prompt KV instead of prefilling it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer briefly, cite your sources and never guess."
PROMPT = "What is a KV cache?"
MAX_TOKENS = 6


@pytest.fixture
def server(sample_model_dir: Path):
    """One long-lived server (serving core + host), as `pie-run` builds it, for runs one after another."""
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from pie_runtime.serving import ServingCore
    from pie_runtime.wasm_host import Host, ServedModel

    loaded = load_model(str(sample_model_dir))
    engine = Engine(loaded, page_size=PAGE_SIZE, num_pages=128)
    core = ServingCore(engine).start()
    try:
        yield Host([ServedModel(loaded.name, engine, core)])
    finally:
        core.stop()


def _run(host, component, *args: str) -> dict:
    from pie_runtime.component_cache import default_cache
    from pie_runtime.instance import Instance
    from pie_runtime.messaging import ClientChannel

    inst = Instance(host, default_cache().load(component), arguments=list(args),
                    client=ClientChannel(on_send=lambda text: None)).start()
    outcome = inst.wait(120)
    assert outcome.ok, outcome.error
    return json.loads(outcome.value)


def test_second_run_imports_the_prefix_and_matches_the_cold_run(samples, server, oracle):
    args = (f"--system={SYSTEM}", f"--prompt={PROMPT}", f"--max-tokens={MAX_TOKENS}")
    cold = _run(server, samples["prefix_caching"], *args)
    warm = _run(server, samples["prefix_caching"], *args)

    system, prompt = oracle.encode(SYSTEM), oracle.encode(PROMPT)
    assert len(system) % PAGE_SIZE  # a shared partial page: the importer must copy it, not write it
    assert (cold["cached"], cold["saved"]) == (False, 0)
    assert (warm["cached"], warm["saved"]) == (True, len(system))
    assert cold["prefilled"] == warm["prefilled"] == len(prompt)
    expected = [t for t in oracle.greedy(system + prompt, MAX_TOKENS, oracle.tokenizer.eos_token_ids)
                if t not in oracle.tokenizer.eos_token_ids]
    assert cold["tokens"] == warm["tokens"] == expected

    # The export survived both writers intact: a third run with another prompt is still exact.
    other = _run(server, samples["prefix_caching"], f"--system={SYSTEM}", "--prompt=Why?",
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
