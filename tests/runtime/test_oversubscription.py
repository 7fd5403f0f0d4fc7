"""Oversubscription: twice the KV demand the pool holds, through real inferlets.

32 greedy generations (the probe guest, real wasmtime, the real serving core
and engine) each need 8 pages at their end, 256 in all, from a pool of 128:
every one completes, none gets `out-of-memory`, and each equals its solo
run token for token. The server reports how often it preempted and how long
instances were paused. The random Mistral checkpoint makes greedy output
depend on the context (a preempted instance restored with wrong K/V would
generate other tokens).
"""

from __future__ import annotations

import json

import pytest

from pie_runtime.host.registry import Host, ServedModel
from pie_runtime.serving import ServingCore
from tests.runtime.guests.fixtures import launch

PAGE_SIZE = 4
POOL_PAGES = 128
GENERATIONS = 32
NEW_TOKENS = 26

WORDS = ["red", "green", "blue", "cold", "warm", "river", "stone", "cloud"]


def _prompts() -> list[str]:
    return [f"{WORDS[i % 8]} {WORDS[(i // 8) % 8]} {WORDS[(3 * i + 1) % 8]} {i}" for i in range(GENERATIONS)]


@pytest.fixture(scope="module")
def served(small_model_dir):
    from engine_jax.engine import Engine
    from tests.helpers.engine_models import load_test_model

    model = load_test_model(small_model_dir("mistral"))
    engine = Engine(model, page_size=PAGE_SIZE, num_pages=POOL_PAGES)
    core = ServingCore(engine, idle_victim_ms=250).start()
    yield Host([ServedModel("mistral", engine, core)], guest_output=lambda *a: None), core, engine
    core.stop()


def _tokens(outcome) -> list[int]:
    assert outcome.ok, outcome.describe()
    return json.loads(outcome.value)["tokens"]


def test_twice_the_pool_all_complete_and_equal_their_solo_runs(served, probe):
    host, core, engine = served
    prompts = _prompts()
    lengths = [len(engine.tokenizer.encode(p)) + NEW_TOKENS - 1 for p in prompts]
    demand = sum(-(-n // PAGE_SIZE) for n in lengths)
    assert demand >= 2 * POOL_PAGES

    solo = [_tokens(launch(host, probe, "generate", p, str(NEW_TOKENS), "run4").wait(120)) for p in prompts]
    assert core.stats.preemptions == 0 and core.stats.alloc_waits == 0
    assert len({tuple(t) for t in solo}) > GENERATIONS // 2  # the outputs depend on the prompt

    instances = [launch(host, probe, "generate", p, str(NEW_TOKENS), "run4") for p in prompts]
    together = [_tokens(inst.wait(300)) for inst in instances]
    assert together == solo
    stats = core.stats
    assert stats.preemptions > 0 and stats.restores > 0 and core.suspended_instances() == []
    assert stats.paused_seconds > 0 and stats.alloc_waits > 0
    print(f"\n{GENERATIONS} generations, {demand} pages of demand on a pool of {POOL_PAGES}: "
          f"{stats.preemptions} preemptions ({stats.pages_preempted} pages), {stats.paused_seconds:.2f}s paused, "
          f"{stats.alloc_waits} allocations waited {stats.alloc_wait_seconds:.2f}s")
    assert core.wait_idle(30) and core.held_pages() == 0 and core.free_pages() == POOL_PAGES
    core.check_invariants()
