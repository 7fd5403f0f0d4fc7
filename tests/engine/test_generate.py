"""The native generation loop: batching, stop tokens, seeds, page accounting."""

from __future__ import annotations

import pytest

from engine_jax.batch import EngineInputError
from engine_jax.engine import Engine
from engine_jax.generate import generate


@pytest.fixture(scope="module")
def engine(tiny_llama_model):
    return Engine(tiny_llama_model, page_size=4, num_pages=40)


def prompts(engine):
    tok = engine.tokenizer
    return [tok.encode("Return the sum of a list."), tok.encode("An iterator"), tok.encode("Make a path")]


def test_batched_greedy_equals_one_at_a_time(engine):
    ps = prompts(engine)
    together = generate(engine, ps, 10)
    alone = [generate(engine, [p], 10)[0] for p in ps]
    assert together == alone
    assert all(len(t) == 10 for t in together)
    assert engine.pool.num_free == engine.num_pages


def test_stop_token_ends_a_sequence_and_is_included(engine):
    ps = prompts(engine)
    full = generate(engine, ps, 10)
    # A token whose first appearance is not the first position, so the stop visibly cuts the run.
    which, at, stop = next((r, i, t) for r, run in enumerate(full) for i, t in enumerate(run)
                           if 0 < i < 9 and t not in run[:i])
    stopped = generate(engine, ps, 10, stop_token_ids=[stop])
    for free_run, run in zip(full, stopped):
        cut = free_run.index(stop) + 1 if stop in free_run else len(free_run)
        assert run == free_run[:cut]
    assert len(stopped[which]) == at + 1


def test_seeded_sampling_is_reproducible(engine):
    ps = prompts(engine)
    a = generate(engine, ps, 8, temperature=1.5, seed=11)
    b = generate(engine, ps, 8, temperature=1.5, seed=11)
    c = generate(engine, ps, 8, temperature=1.5, seed=12)
    assert a == b and a != c
    assert generate(engine, ps, 8, temperature=1.5, top_k=1, seed=3) == generate(engine, ps, 8)


def test_bad_arguments_and_exhausted_pool_leave_no_pages_behind(engine):
    with pytest.raises(EngineInputError, match="prompt 1 is empty"):
        generate(engine, [[1], []], 3)
    with pytest.raises(EngineInputError, match="outside the vocabulary"):
        generate(engine, [[1, 10_000]], 3)
    with pytest.raises(EngineInputError, match="exceed max_position_embeddings=512"):
        generate(engine, [[1] * 500], 20)
    with pytest.raises(EngineInputError, match="top_p=0.0"):
        generate(engine, [[1]], 3, temperature=1.0, top_p=0.0)
    with pytest.raises(EngineInputError, match="out of KV pages"):
        generate(engine, [[1] * 100, [2] * 100], 5)
    assert engine.pool.num_free == engine.num_pages
    assert generate(engine, [[1, 2]], 0) == [[]]
