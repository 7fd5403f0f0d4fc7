"""Compiling common step shapes before serving: afterwards a step of a warmed shape compiles nothing."""

from __future__ import annotations

import jax

from engine_jax.batch import ForwardRequest, Sample
from engine_jax.engine import Engine, _step_jit
from pie_runtime.server.warmup import warm_up, warmup_shapes


def test_warmed_shapes_do_not_compile_again(tiny_llama_model):
    # Start from empty executable caches: past the memory-map budget the engine clears them
    # itself (engine_jax.map_budget), which would drop a warmed shape mid-test.
    jax.clear_caches()
    engine = Engine(tiny_llama_model, page_size=4, num_pages=32)
    shapes = warmup_shapes(engine, [1, 2], [6])
    assert [s[0] for s in shapes].count("prefill") == 1 and len(shapes) == 1 + 2 * 4 * 2
    lines = []
    assert warm_up(engine, [1, 2], [6], lines.append) == len(shapes)
    assert "compiled 17 step shapes" in lines[0]
    assert engine.pool.num_free == 32  # the pages it borrowed went back
    compiled = _step_jit._cache_size()
    pages = engine.pool.alloc(4)
    # Two sequences decoding at 6 and 7 tokens (2 pages each), greedy: a warmed shape.
    requests = [ForwardRequest(tokens=[5], positions=[n - 1], pages=pages[2 * r:2 * r + 2], last_page_len=n - 4,
                               outputs=(Sample(index=0),)) for r, n in enumerate((6, 7))]
    engine.step(requests)
    assert _step_jit._cache_size() == compiled
    engine.pool.free(pages)
