"""The Pallas paged-attention kernel (interpret mode) == naive dense attention == the jnp reference.

Shapes are kept in a few fixed buckets (tokens, requests, pages) so the jitted
kernel compiles once per (backend, page size, GQA ratio, mask) combination;
hypothesis varies the ragged structure and the data inside those shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_jax.paged_attention.kernel import paged_attention_kernel

NUM_TOKENS = 40  # >= 4 requests x 9 new tokens, so there are always padding rows
NUM_REQUESTS = 5  # >= 4 real requests + at least one padding request
NUM_KV_HEADS = 2
HEAD_DIM = 16
# page_size -> (max_pages per request, pages in the pool)
POOL = {4: (10, 48), 16: (3, 16)}
SCALE = 0.25
# Small tiles so requests span several query blocks and kv walks span several kv blocks.
SMALL_TILES = {"block_q": 4, "pages_per_block": 2}


def dense_attention(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, mask, scale):
    """Naive float64 attention: per request, its dense K/V; per token and head, a masked softmax."""
    num_tokens, num_heads, _ = q.shape
    page_size = k_pages.shape[1]
    group = num_heads // k_pages.shape[2]
    out = np.zeros(q.shape, np.float64)
    for r in range(len(kv_lens)):
        slots = np.arange(int(kv_lens[r]))
        pages = page_table[r, slots // page_size]
        k = k_pages[pages, slots % page_size].astype(np.float64)  # [n, kvh, d]
        v = v_pages[pages, slots % page_size].astype(np.float64)
        valid = slot_valid[pages, slots % page_size]
        for t in range(cu_q_lens[r], cu_q_lens[r + 1]):
            rule = mask[t, : len(slots)] if mask is not None else slots <= q_slots[t]
            allowed = valid & rule
            if not allowed.any():
                continue  # nothing to attend: zeros
            for h in range(num_heads):
                s = np.where(allowed, (k[:, h // group] @ q[t, h].astype(np.float64)) * scale, -np.inf)
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ v[:, h // group]
    return out


@dataclass
class Batch:
    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    slot_valid: np.ndarray
    page_table: np.ndarray
    kv_lens: np.ndarray
    cu_q_lens: np.ndarray
    q_slots: np.ndarray
    custom_mask: np.ndarray | None

    def args(self) -> list:
        return [
            None if x is None else jnp.asarray(x)
            for x in (
                self.q,
                self.k_pages,
                self.v_pages,
                self.slot_valid,
                self.page_table,
                self.kv_lens,
                self.cu_q_lens,
                self.q_slots,
                self.custom_mask,
            )
        ]

    def dense(self) -> np.ndarray:
        return dense_attention(
            self.q,
            self.k_pages,
            self.v_pages,
            self.slot_valid,
            self.page_table,
            self.kv_lens,
            self.cu_q_lens,
            self.q_slots,
            self.custom_mask,
            SCALE,
        )

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[-1])


def make_batch(
    seed: int,
    page_size: int,
    group: int,
    q_lens: list[int],
    prefixes: list[int],
    *,
    with_mask: bool,
    tail_slots: bool = True,
    valid_fraction: float = 0.8,
    dtype=np.float32,
) -> Batch:
    """A ragged batch: real requests (q_len > 0) shuffled among padding requests (kv_len 0)."""
    rng = np.random.default_rng(seed)
    max_pages, num_pages = POOL[page_size]
    num_real = len(q_lens)
    order = rng.permutation(NUM_REQUESTS)  # request slots of the real requests, the rest pad
    q_len_of = np.zeros(NUM_REQUESTS, np.int32)
    kv_len_of = np.zeros(NUM_REQUESTS, np.int32)
    for i in range(num_real):
        q_len_of[order[i]] = q_lens[i]
        kv_len_of[order[i]] = prefixes[i] + q_lens[i]
    cu = np.concatenate([[0], np.cumsum(q_len_of)]).astype(np.int32)

    # Distinct shuffled physical pages per request; unused table entries are random valid ids.
    page_table = rng.integers(0, num_pages, (NUM_REQUESTS, max_pages)).astype(np.int32)
    free = list(rng.permutation(num_pages))
    for r in range(NUM_REQUESTS):
        used = -(-int(kv_len_of[r]) // page_size)
        page_table[r, :used] = [free.pop() for _ in range(used)]

    # Padding tokens get garbage slots: the kernel must not read them.
    q_slots = rng.integers(-3, max_pages * page_size + 3, NUM_TOKENS).astype(np.int32)
    for r in range(NUM_REQUESTS):
        n, kv = int(q_len_of[r]), int(kv_len_of[r])
        if tail_slots:  # the engine's layout: new tokens fill the sequence's tail
            q_slots[cu[r] : cu[r] + n] = np.arange(kv - n, kv)
        else:  # any slots inside the sequence (the kernel's rule is just j <= slot)
            q_slots[cu[r] : cu[r] + n] = rng.integers(0, kv, n)

    num_q_heads = NUM_KV_HEADS * group
    q = rng.standard_normal((NUM_TOKENS, num_q_heads, HEAD_DIM)).astype(dtype)
    k_pages = rng.standard_normal((num_pages, page_size, NUM_KV_HEADS, HEAD_DIM)).astype(dtype)
    v_pages = rng.standard_normal((num_pages, page_size, NUM_KV_HEADS, HEAD_DIM)).astype(dtype)
    slot_valid = rng.random((num_pages, page_size)) < valid_fraction
    mask = rng.random((NUM_TOKENS, max_pages * page_size)) < 0.6 if with_mask else None
    return Batch(q, k_pages, v_pages, slot_valid, page_table, kv_len_of, cu, q_slots, mask)


@st.composite
def batches(draw) -> Batch:
    page_size = draw(st.sampled_from(sorted(POOL)))
    group = draw(st.sampled_from([1, 2, 4]))
    max_slots = POOL[page_size][0] * page_size
    num_real = draw(st.integers(1, 4))
    q_lens = [draw(st.integers(1, 9)) for _ in range(num_real)]
    # Prefix lengths cover empty prefixes, page-aligned ends and partial last pages.
    prefixes = [draw(st.integers(0, max_slots - n)) for n in q_lens]
    return make_batch(
        draw(st.integers(0, 2**31 - 1)),
        page_size,
        group,
        q_lens,
        prefixes,
        with_mask=draw(st.booleans()),
        tail_slots=draw(st.booleans()),
    )


@functools.cache
def _jitted_reference():
    from engine_jax.paged_attention.reference import paged_attention_reference

    return jax.jit(functools.partial(paged_attention_reference, scale=SCALE))


def run_kernel(batch: Batch, backend: str, **tiles) -> np.ndarray:
    out = paged_attention_kernel(*batch.args(), scale=SCALE, interpret=True, backend=backend, **tiles)
    return np.asarray(out)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches())
def test_kernel_matches_dense_and_reference(backend: str, batch: Batch) -> None:
    out = run_kernel(batch, backend, **SMALL_TILES)
    n = batch.num_real_tokens
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    np.testing.assert_allclose(out[:n], batch.dense()[:n], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:n], np.asarray(_jitted_reference()(*batch.args()))[:n], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out[n:]).all()  # padding rows: any finite value


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_all_masked_rows_output_zeros(backend: str, with_mask: bool) -> None:
    batch = make_batch(7, 4, 2, q_lens=[3, 5, 2], prefixes=[6, 0, 9], with_mask=with_mask)
    order = np.flatnonzero(batch.kv_lens)  # request slots of the three real requests
    # Request A: every slot of its pages masked out.
    a = order[0]
    batch.slot_valid[batch.page_table[a, : -(-batch.kv_lens[a] // 4)]] = False
    # Request B: its first token may only see slot 0, which is invalid.
    b = order[1]
    batch.slot_valid[batch.page_table[b, 0], 0] = False
    first_b = batch.cu_q_lens[b]
    batch.q_slots[first_b] = 0
    if with_mask:
        batch.custom_mask[first_b] = False
        batch.custom_mask[first_b, 0] = True
    dense = batch.dense()
    out = run_kernel(batch, backend, **SMALL_TILES)
    rows_a = slice(batch.cu_q_lens[a], batch.cu_q_lens[a + 1])
    assert np.all(out[rows_a] == 0.0) and np.all(out[first_b] == 0.0)
    assert np.abs(out[first_b + 1 : batch.cu_q_lens[b + 1]]).sum() > 0  # B's other tokens do attend
    n = batch.num_real_tokens
    np.testing.assert_allclose(out[:n], dense[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_default_tiles_bfloat16(backend: str) -> None:
    """Production tiles and dtype: bf16 inputs, float32 softmax, bf16 output."""
    batch = make_batch(3, 16, 2, q_lens=[9, 1, 4, 1], prefixes=[0, 30, 20, 5], with_mask=False, dtype=np.float32)
    bf16 = jnp.bfloat16
    args = batch.args()
    for i in (0, 1, 2):
        args[i] = args[i].astype(bf16)
    out = paged_attention_kernel(*args, scale=SCALE, interpret=True, backend=backend)
    assert out.dtype == bf16
    # The oracle sees the same bf16-rounded inputs; the residual error is the bf16 P@V and output rounding.
    rounded = [np.asarray(a.astype(jnp.float32)) for a in args[:3]]
    dense = dense_attention(*rounded, *[np.asarray(a) for a in args[3:8]], None, SCALE)
    n = batch.num_real_tokens
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32))[:n], dense[:n], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_non_power_of_two_group(backend: str) -> None:
    """GQA group 3 (Qwen-like head counts): the gpu body pads the group to 4 rows per token."""
    batch = make_batch(5, 4, 3, q_lens=[4, 1], prefixes=[7, 12], with_mask=False)
    out = run_kernel(batch, backend, **SMALL_TILES)
    n = batch.num_real_tokens
    np.testing.assert_allclose(out[:n], batch.dense()[:n], rtol=1e-5, atol=1e-5)


def test_tpu_body_in_tpu_interpreter() -> None:
    """The Mosaic body under the TPU interpreter: scalar prefetch in SMEM, pipelined page DMAs."""
    from jax.experimental.pallas import tpu as pltpu

    batch = make_batch(11, 16, 2, q_lens=[5, 2], prefixes=[17, 40], with_mask=True)
    out = paged_attention_kernel(
        *batch.args(), scale=SCALE, interpret=pltpu.InterpretParams(), backend="tpu", **SMALL_TILES
    )
    n = batch.num_real_tokens
    np.testing.assert_allclose(np.asarray(out)[:n], batch.dense()[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("with_mask", [False, True])
def test_lowers_for_accelerators(backend: str, platform: str, with_mask: bool) -> None:
    """Cross-lower (no device needed) a Llama-like bf16 layer to Triton / Mosaic.

    This runs the Pallas -> Triton IR and Pallas -> Mosaic lowerings (power-of-two
    tensor sizes, supported primitives, TPU block-shape rules); the final Triton
    and Mosaic compilers only run on the device.
    """
    t, q_heads, kv_heads, d, pages, s, r, max_pages = 64, 8, 2, 64, 64, 16, 8, 16
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
        jax.ShapeDtypeStruct((t, max_pages * s), jnp.bool_) if with_mask else None,
    )
    fn = functools.partial(paged_attention_kernel, scale=0.125, backend=backend)
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert ("triton" if backend == "gpu" else "tpu_custom_call") in text


def test_rejects_mask_of_wrong_width() -> None:
    batch = make_batch(0, 4, 1, q_lens=[2], prefixes=[3], with_mask=True)
    args = batch.args()
    args[8] = args[8][:, :-1]
    with pytest.raises(ValueError, match="custom_mask"):
        paged_attention_kernel(*args, scale=SCALE, interpret=True)
