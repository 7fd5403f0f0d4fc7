"""The page pool (host free list) and the device ops on the KV pool."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from engine_jax.batch import EngineInputError
from engine_jax.config import ModelConfig
from engine_jax.engine import Engine
from engine_jax.kv_cache import OutOfPages, PagePool, page_bytes, pages_for_budget
from tests.engine.engine_utils import request, step_logprobs


def test_pool_allocates_frees_and_counts():
    pool = PagePool(5)
    assert (pool.num_pages, pool.num_free) == (5, 5)
    a = pool.alloc(3)
    assert len(set(a)) == 3 and all(0 <= p < 5 for p in a)
    assert pool.num_free == 2 and all(pool.is_allocated(p) for p in a)
    b = pool.alloc(2)
    assert not set(a) & set(b)
    with pytest.raises(OutOfPages, match="requested 1, only 0 of 5 free"):
        pool.alloc(1)
    assert issubclass(OutOfPages, EngineInputError)
    pool.free(a)
    assert pool.num_free == 3 and not pool.is_allocated(a[0])
    assert sorted(pool.alloc(3)) == sorted(a)
    assert pool.alloc(0) == []


def test_pool_rejects_bad_frees():
    pool = PagePool(4)
    ids = pool.alloc(2)
    with pytest.raises(EngineInputError, match="out of range"):
        pool.free([7])
    with pytest.raises(EngineInputError, match="duplicates"):
        pool.free([ids[0], ids[0]])
    free_id = next(p for p in range(4) if p not in ids)
    with pytest.raises(EngineInputError, match=f"pages \\[{free_id}\\] are already free"):
        pool.free([free_id])
    assert pool.num_free == 2  # failed frees change nothing
    with pytest.raises(EngineInputError, match="negative"):
        pool.alloc(-1)


def test_pool_is_consistent_under_concurrent_alloc_free_and_take_fresh():
    """Request threads allocate and free while the engine thread takes the
    fresh pages: every page handed out is taken as fresh exactly once per
    allocation, and the free count comes back."""
    import threading

    pool = PagePool(64)
    allocations: list[int] = []
    taken: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def request_thread() -> None:
        for _ in range(300):
            ids = pool.alloc(3)
            with lock:
                allocations.extend(ids)
            pool.free(ids)

    def engine_thread() -> None:
        while not stop.is_set():
            taken.extend(pool.take_fresh())

    engine = threading.Thread(target=engine_thread)
    engine.start()
    workers = [threading.Thread(target=request_thread) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    engine.join()
    taken.extend(pool.take_fresh())
    assert sorted(taken) == sorted(allocations) and len(allocations) == 4 * 300 * 3
    assert pool.num_free == 64


def test_budget_sizing():
    config = ModelConfig(architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4)
    per_page = 3 * 2 * 16 * 1 * 4 * 4 + 16  # layers * (K,V) * slots * heads * dim * f32 + valid bits
    assert page_bytes(config, 16, jnp.float32) == per_page
    assert pages_for_budget(config, 16, jnp.float32, 10 * per_page + 5) == 10
    with pytest.raises(ValueError, match="holds no page"):
        pages_for_budget(config, 16, jnp.float32, per_page - 1)


def test_engine_default_pool_comes_from_memory_budget(tiny_llama_model):
    per_page = page_bytes(tiny_llama_model.config, 8, jnp.float32)
    engine = Engine(tiny_llama_model, page_size=8, kv_memory_bytes=7 * per_page)
    assert engine.num_pages == engine.pool.num_pages == 7
    assert engine.cache.k[0].shape == (7, 8, 2, 16)


@pytest.fixture
def engine(tiny_llama_model):
    return Engine(tiny_llama_model, page_size=4, num_pages=16)


def test_fresh_pages_start_with_every_slot_invalid(engine):
    [page] = engine.pool.alloc(1)
    engine.step([request(engine, [1, 2, 3], range(3), [page], 3, with_logprobs=False)])
    assert engine.slot_valid()[page].tolist() == [True, True, True, False]
    engine.pool.free([page])
    [again] = engine.pool.alloc(1)
    assert again == page
    assert not engine.slot_valid()[page].any()  # the previous owner's KV is unreachable


def test_set_valid_and_copy_slots_move_kv_and_bits(engine):
    src, dst = engine.pool.alloc(2)
    engine.step([request(engine, [1, 2, 3, 4], range(4), [src], 4, with_logprobs=False)])
    engine.set_valid(src, 1, 2, False)
    assert engine.slot_valid()[src].tolist() == [True, False, False, True]
    engine.copy_slots(src, 0, dst, 1, 3)
    assert engine.slot_valid()[dst].tolist() == [False, True, False, False]
    for layer in range(engine.config.num_layers):
        k, v = np.asarray(engine.cache.k[layer]), np.asarray(engine.cache.v[layer])
        np.testing.assert_array_equal(k[dst, 1:4], k[src, 0:3])
        np.testing.assert_array_equal(v[dst, 1:4], v[src, 0:3])
        assert np.abs(k[src, 0:3]).sum() > 0
    # Overlapping copy within one page behaves like memmove.
    before = np.asarray(engine.cache.k[0])[src].copy()
    engine.copy_slots(src, 0, src, 1, 3)
    np.testing.assert_array_equal(np.asarray(engine.cache.k[0])[src, 1:4], before[0:3])
    engine.copy_slots(src, 0, dst, 0, 0)  # count 0 is a no-op


def test_copied_page_continues_the_sequence_identically(engine):
    """Fork: copy a sequence's partial last page, then decode the same token on both branches."""
    tokens = [5, 9, 40, 41, 42, 43]
    a = engine.pool.alloc(2)
    a_third, b_third = engine.pool.alloc(2)
    engine.step([request(engine, tokens, range(6), a, 6, with_logprobs=False)])
    [b_last] = engine.pool.alloc(1)
    engine.copy_page(a[1], b_last)
    b = [a[0], b_last]
    left = step_logprobs(engine, request(engine, [77], [6], a, 7))
    right = step_logprobs(engine, request(engine, [77], [6], b, 7))
    np.testing.assert_array_equal(left, right)
    # The branches diverge; each must then behave exactly like its own history run from scratch.
    engine.step([request(engine, [3], [7], a, 8, with_logprobs=False),
                 request(engine, [200], [7], b, 8, with_logprobs=False)])
    a, b = a + [a_third], b + [b_third]
    branch_b = step_logprobs(engine, request(engine, [11], [8], b, 9))
    fresh = engine.pool.alloc(3)
    scratch = step_logprobs(engine, request(engine, tokens + [77, 200, 11], range(9), fresh, 9))
    np.testing.assert_allclose(branch_b[0], scratch[-1], atol=1e-5)
    branch_a = step_logprobs(engine, request(engine, [11], [8], a, 9))
    assert np.abs(branch_a - branch_b).max() > 1e-3


def _attack_logprobs(engine, page):
    """What a new owner of `page` computes after making its unwritten slots attendable
    (as `mask-slots(..., masked=false)` would) and attending them with one token."""
    engine.set_valid(page, 0, engine.page_size, True)
    return step_logprobs(engine, request(engine, [9], [3], [page], 4))


def test_a_reused_page_is_cleared_so_results_are_bit_identical_to_a_never_used_one(engine):
    [page] = engine.pool.alloc(1)
    never_used = _attack_logprobs(engine, page)
    engine.pool.free([page])
    # Someone writes a secret into the page and frees it; the page goes to a new owner.
    [secret_page] = engine.pool.alloc(1)
    assert secret_page == page
    engine.step([request(engine, [101, 102, 103, 104], range(4), [secret_page], 4, with_logprobs=False)])
    assert np.abs(np.asarray(engine.cache.k[0])[page]).sum() > 0
    engine.pool.free([secret_page])
    [reused] = engine.pool.alloc(1)
    assert reused == page
    np.testing.assert_array_equal(_attack_logprobs(engine, reused), never_used)  # bit for bit
    for layer in range(engine.config.num_layers):
        assert not np.asarray(engine.cache.k[layer])[page, :3].any()
        assert not np.asarray(engine.cache.v[layer])[page, :3].any()
    engine.pool.free([reused])


def test_saved_pages_load_into_other_pages_and_continue_identically(engine):
    tokens = [5, 9, 40, 41, 42, 43]
    a = engine.pool.alloc(2)
    engine.step([request(engine, tokens, range(6), a, 6, with_logprobs=False)])
    engine.set_valid(a[0], 1, 1, False)  # the valid bits travel too
    want = step_logprobs(engine, request(engine, [77], [6], a, 7))
    saved = engine.save_pages(a)
    assert len(saved) == 2 and saved.nbytes > 0
    b = engine.pool.alloc(2)  # other physical pages
    engine.pool.free(a)
    engine.load_pages(b, saved)
    got = step_logprobs(engine, request(engine, [77], [6], b, 7))
    np.testing.assert_array_equal(got, want)
    engine.pool.free(b)
