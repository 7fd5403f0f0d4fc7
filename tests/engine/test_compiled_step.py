"""Structural checks of the compiled step: the KV pool is updated in place, and other attention backends agree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine_jax.batch import Distribution, ForwardRequest, Sample
from engine_jax.engine import Engine, _bucket_pages
from tests.engine.engine_utils import request, step_logprobs


def test_step_updates_the_donated_pool_without_copying_it(tiny_llama_model):
    # 999 pages makes the cache shape unmistakable in the HLO text.
    engine = Engine(tiny_llama_model, page_size=8, num_pages=999)
    c = engine.config
    pages = [engine.pool.alloc(3) for _ in range(4)]
    requests = [ForwardRequest(tokens=[7], positions=[20], pages=p, last_page_len=5,
                               outputs=(Sample(index=0, temperature=1.0, top_p=0.9), Distribution(index=0, k=4)))
                for p in pages]
    hlo = engine.step_hlo(requests)
    layer_shape = f"[999,8,{c.num_kv_heads},{c.head_dim}]"
    header = hlo.splitlines()[0]
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", header).group(1)
    # K and V of every layer plus the valid bits are aliased to outputs (donated, updated in place).
    assert aliases.count("may-alias") == 2 * c.num_layers + 1
    entry = hlo[hlo.index("\nENTRY"):]
    for line in entry.splitlines():
        if layer_shape in line.split("=", 1)[-1].split("(", 1)[0]:
            op = line.split("=", 1)[1]
            assert not re.search(r"\b(copy|copy-start|transpose)\(", op), line
            assert "scatter" in line or "parameter(" in line or "tuple(" in line, line
    assert engine.step(requests)  # and it runs


def test_page_table_widths_waste_under_a_fifth_past_eight_pages():
    widths = [_bucket_pages(n) for n in range(1, 2049)]
    assert widths == sorted(widths)
    for n, width in enumerate(widths, start=1):
        assert width >= n
        assert width <= max(8, 5 * n // 4), (n, width)  # unused < a fifth of the width (powers of two: half)
    # Few shapes: powers of two and the quarter steps between them only.
    assert set(widths) <= {1 << k for k in range(12)} | {m << k for m in (5, 3, 7) for k in range(1, 11)}
    # Prefill batches (the by-request path walks whole 256-slot blocks) keep powers of two.
    assert {_bucket_pages(n, decode=False) for n in range(1, 2049)} == {1 << k for k in range(12)}


def test_decode_attends_over_a_non_power_of_two_page_table(tiny_llama_model):
    """A decode step of a 9-page sequence runs with a 10-wide page table; its logits equal
    those of the same step batched with a 13-page sequence (a 14-wide table)."""
    engine = Engine(tiny_llama_model, page_size=4, num_pages=64)
    tokens = np.random.default_rng(3).integers(0, engine.config.vocab_size, 50).tolist()
    alone_pages, mixed_pages, long_pages = engine.pool.alloc(9), engine.pool.alloc(9), engine.pool.alloc(13)
    for pages, n in ((alone_pages, 34), (mixed_pages, 34), (long_pages, 49)):
        engine.step([ForwardRequest(tokens=tokens[:n], positions=range(n), pages=pages,
                                    last_page_len=(n - 1) % 4 + 1, outputs=())])

    def decode(pages, n):  # token n - 1 at position n - 1, after n - 1 prefilled
        return ForwardRequest(tokens=tokens[n - 1:n], positions=[n - 1], pages=pages, last_page_len=(n - 1) % 4 + 1,
                              outputs=(Distribution(index=0, k=8),))
    assert re.search(r"s32\[1,10\]", engine.step_hlo([decode(alone_pages, 35)]))
    (alone,) = engine.step([decode(alone_pages, 35)])
    mixed, _ = engine.step([decode(mixed_pages, 35), decode(long_pages, 50)])
    assert alone[0][0] == mixed[0][0]
    np.testing.assert_allclose(alone[0][1], mixed[0][1], rtol=1e-5, atol=1e-6)


def test_kernel_in_interpret_mode_matches_the_reference(tiny_llama_model):
    tokens = tiny_llama_model.tokenizer.encode("Return a new list containing all items from the iterable")
    results = []
    for attention in ("reference", "interpret"):
        engine = Engine(tiny_llama_model, page_size=4, num_pages=8, attention=attention)
        pages = engine.pool.alloc(4)
        first = step_logprobs(engine, request(engine, tokens[:6], range(6), pages, 6))
        mask = np.tril(np.ones((4, 10), bool), 6)
        mask[:, 1] = False
        second = step_logprobs(engine, request(engine, tokens[6:10], range(6, 10), pages, 10, mask=mask))
        results.append(np.concatenate([first, second]))
    np.testing.assert_allclose(results[1], results[0], atol=2e-5)


def test_engine_clears_compiled_executables_past_its_memory_map_budget(tiny_llama_model):
    """Every compiled kernel holds memory mappings; past the budget the engine drops JAX's
    executable caches (the mappings go with them) and goes on computing the same results."""
    import jax

    from engine_jax import map_budget
    from engine_jax.engine import _step_jit

    if map_budget.map_count() is None:
        pytest.skip("this platform has no /proc/self/maps to count mappings in")
    jax.clear_caches()  # both shapes below compile here, whatever ran before in this process
    engine = Engine(tiny_llama_model, page_size=4, num_pages=64)
    tokens = np.random.default_rng(5).integers(0, engine.config.vocab_size, 40).tolist()

    def logprobs_after(n: int):
        pages = engine.pool.alloc(-(-n // 4))
        try:
            (out,) = engine.step([ForwardRequest(tokens=tokens[:n], positions=range(n), pages=pages,
                                                 last_page_len=(n - 1) % 4 + 1,
                                                 outputs=(Distribution(index=n - 1, k=5),))])
            return out[0]
        finally:
            engine.pool.free(pages)

    before = logprobs_after(9)
    # A limit just above what the process holds now: the next new shape goes over it.
    engine.map_budget = map_budget.MapBudget(limit=map_budget.map_count() + 8, fraction=1.0)
    held = map_budget.map_count()
    after = logprobs_after(21)  # 6 pages: a shape not compiled yet
    assert engine.map_budget.clears == 1
    assert _step_jit._cache_size() == 0  # every step executable was dropped ...
    assert map_budget.map_count() < held  # ... and its mappings with it
    assert len(after[0]) == 5  # the step that went over the budget returned its results
    again = logprobs_after(9)  # compiled again
    assert before[0] == again[0]
    np.testing.assert_allclose(before[1], again[1], rtol=1e-6)
