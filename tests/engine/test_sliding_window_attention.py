"""Sliding-window attention by position (Gemma's local layers) in every attention path.

A window is a rule on positions, not slots: slot ``j`` is seen by token ``t``
only if ``q_positions[t] - kv_positions[j] < window``, on top of the valid bits
and the causal rule or custom mask. For dense attention that is one more mask,
so the oracle is naive dense attention with the window folded into an explicit
mask. Batches reuse the kernel tests' ragged shapes (fixed buckets, so the
jitted paths compile once per combination).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_jax.paged_attention.kernel import paged_attention_kernel
from engine_jax.paged_attention.reference import paged_attention_by_request, paged_attention_per_token
from tests.engine.test_paged_attention_kernel import POOL, SCALE, SMALL_TILES, Batch, dense_attention, make_batch


def with_positions(batch: Batch, seed: int, gapped: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q_positions, kv_positions): each request's slot j holds position j + offset, or a random
    increasing sequence with gaps; unused slots hold garbage."""
    rng = np.random.default_rng(seed)
    page_size = batch.k_pages.shape[1]
    kv_positions = rng.integers(-50, 200, batch.slot_valid.shape).astype(np.int32)
    q_positions = rng.integers(-50, 200, batch.q.shape[0]).astype(np.int32)
    for r, kv_len in enumerate(batch.kv_lens):
        slots = np.arange(int(kv_len))
        steps = rng.integers(1, 4, len(slots)) if gapped else np.ones(len(slots), np.int64)
        positions = int(rng.integers(0, 20)) + np.cumsum(steps) - 1
        kv_positions[batch.page_table[r, slots // page_size], slots % page_size] = positions
        lo, hi = batch.cu_q_lens[r], batch.cu_q_lens[r + 1]
        q_positions[lo:hi] = positions[batch.q_slots[lo:hi]]
    return q_positions, kv_positions


def dense_with_window(batch: Batch, window: int, q_positions, kv_positions) -> np.ndarray:
    page_size = batch.k_pages.shape[1]
    width = batch.page_table.shape[1] * page_size
    slots = np.arange(width)
    rule = np.zeros((batch.q.shape[0], width), bool)
    for r in range(len(batch.kv_lens)):
        kv_pos = kv_positions[batch.page_table[r, slots // page_size], slots % page_size]
        for t in range(batch.cu_q_lens[r], batch.cu_q_lens[r + 1]):
            base = batch.custom_mask[t] if batch.custom_mask is not None else slots <= batch.q_slots[t]
            rule[t] = base & (q_positions[t] - kv_pos < window)
    return dense_attention(batch.q, batch.k_pages, batch.v_pages, batch.slot_valid, batch.page_table,
                           batch.kv_lens, batch.cu_q_lens, batch.q_slots, rule, SCALE)


@st.composite
def windowed_batches(draw):
    page_size = draw(st.sampled_from(sorted(POOL)))
    max_slots = POOL[page_size][0] * page_size
    num_real = draw(st.integers(1, 4))
    q_lens = [draw(st.integers(1, 9)) for _ in range(num_real)]
    prefixes = [draw(st.integers(0, max_slots - n)) for n in q_lens]
    seed = draw(st.integers(0, 2**31 - 1))
    batch = make_batch(seed, page_size, draw(st.sampled_from([1, 2])), q_lens, prefixes,
                       with_mask=draw(st.booleans()), tail_slots=draw(st.booleans()))
    q_positions, kv_positions = with_positions(batch, seed, gapped=draw(st.booleans()))
    return batch, draw(st.sampled_from([1, 3, 8])), q_positions, kv_positions


def window_args(window, q_positions, kv_positions) -> dict:
    return dict(window=window, q_positions=jnp.asarray(q_positions), kv_positions=jnp.asarray(kv_positions))


@functools.cache
def jitted_path(name: str):
    if name == "per_token":
        fn = paged_attention_per_token
    else:  # small jobs and blocks, so the block skipping before the window is exercised
        fn = functools.partial(paged_attention_by_request, chunk=2, block_pages=1)
    return jax.jit(functools.partial(fn, scale=SCALE), static_argnames="window")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=windowed_batches())
def test_reference_paths_match_dense_attention_with_window(case) -> None:
    batch, window, q_positions, kv_positions = case
    want = dense_with_window(batch, window, q_positions, kv_positions)
    n = batch.num_real_tokens
    for name in ("per_token", "by_request"):
        got = np.asarray(jitted_path(name)(*batch.args(), **window_args(window, q_positions, kv_positions)))
        np.testing.assert_allclose(got[:n], want[:n], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=windowed_batches())
def test_kernel_matches_dense_and_reference_with_window(backend: str, case) -> None:
    batch, window, q_positions, kv_positions = case
    extra = window_args(window, q_positions, kv_positions)
    out = np.asarray(paged_attention_kernel(*batch.args(), scale=SCALE, interpret=True, backend=backend,
                                            **SMALL_TILES, **extra))
    n = batch.num_real_tokens
    np.testing.assert_allclose(out[:n], dense_with_window(batch, window, q_positions, kv_positions)[:n],
                               rtol=1e-5, atol=1e-5)
    reference = np.asarray(jitted_path("per_token")(*batch.args(), **extra))
    np.testing.assert_allclose(out[:n], reference[:n], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()


def test_window_really_restricts_attention() -> None:
    """A long prefix with positions = slots: a window of 2 differs from full attention and equals
    a dense mask of the last two slots (so a path that ignored the window would fail)."""
    batch = make_batch(5, 4, 2, q_lens=[3], prefixes=[30], with_mask=False, valid_fraction=1.0)
    q_positions, kv_positions = with_positions(batch, 5, gapped=False)
    extra = window_args(2, q_positions, kv_positions)
    n = batch.num_real_tokens
    full = np.asarray(jitted_path("per_token")(*batch.args()))[:n]
    for got in (np.asarray(jitted_path("per_token")(*batch.args(), **extra))[:n],
                np.asarray(jitted_path("by_request")(*batch.args(), **extra))[:n],
                np.asarray(paged_attention_kernel(*batch.args(), scale=SCALE, interpret=True, **SMALL_TILES,
                                                  **extra))[:n]):
        assert np.abs(got - full).max() > 1e-2
        np.testing.assert_allclose(got, dense_with_window(batch, 2, q_positions, kv_positions)[:n],
                                   rtol=1e-5, atol=1e-5)


def test_window_needs_positions() -> None:
    batch = make_batch(0, 4, 1, q_lens=[2], prefixes=[3], with_mask=False)
    for fn in (paged_attention_per_token, paged_attention_by_request):
        with pytest.raises(ValueError, match="q_positions"):
            fn(*batch.args(), scale=SCALE, window=4)
    with pytest.raises(ValueError, match="kv_positions"):
        paged_attention_kernel(*batch.args(), scale=SCALE, interpret=True, window=4,
                               q_positions=jnp.zeros(batch.q.shape[0], jnp.int32))


def test_tpu_body_with_window_in_tpu_interpreter() -> None:
    """The Mosaic body's window path under the TPU interpreter (kv_start in SMEM drives the page DMAs)."""
    from jax.experimental.pallas import tpu as pltpu

    batch = make_batch(11, 16, 2, q_lens=[5, 2], prefixes=[17, 25], with_mask=False)
    q_positions, kv_positions = with_positions(batch, 11, gapped=True)
    out = paged_attention_kernel(*batch.args(), scale=SCALE, interpret=pltpu.InterpretParams(), backend="tpu",
                                 block_q=8, pages_per_block=1, **window_args(5, q_positions, kv_positions))
    n = batch.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n], dense_with_window(batch, 5, q_positions, kv_positions)[:n],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_window_lowers_for_accelerators(backend: str, platform: str) -> None:
    """Cross-lower a Gemma-like bf16 local layer (head_dim 256, one kv head) to Triton / Mosaic."""
    t, q_heads, kv_heads, d, pages, s, r, max_pages = 64, 4, 1, 256, 64, 16, 8, 16
    bf16, i32 = jnp.bfloat16, jnp.int32
    shapes = (
        jax.ShapeDtypeStruct((t, q_heads, d), bf16),
        jax.ShapeDtypeStruct((pages, s, kv_heads, d), bf16),
        jax.ShapeDtypeStruct((pages, s, kv_heads, d), bf16),
        jax.ShapeDtypeStruct((pages, s), jnp.bool_),
        jax.ShapeDtypeStruct((r, max_pages), i32),
        jax.ShapeDtypeStruct((r,), i32),
        jax.ShapeDtypeStruct((r + 1,), i32),
        jax.ShapeDtypeStruct((t,), i32),
        None,
    )
    positions = (jax.ShapeDtypeStruct((t,), i32), jax.ShapeDtypeStruct((pages, s), i32))
    fn = functools.partial(paged_attention_kernel, scale=0.0625, backend=backend, window=512)
    text = jax.jit(lambda *a: fn(*a[:9], q_positions=a[9], kv_positions=a[10])).trace(
        *shapes, *positions).lower(lowering_platforms=(platform,)).as_text()
    assert ("triton" if backend == "gpu" else "tpu_custom_call") in text
