"""The jnp paged attention against a naive dense numpy attention."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_jax.paged_attention import paged_attention, resolve_attention
from engine_jax.paged_attention import reference as reference_module
from engine_jax.paged_attention.reference import paged_attention_reference


def naive_attention(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, mask, scale):
    """Per request: build the dense K/V of its sequence and loop over its tokens."""
    num_tokens, num_heads, head_dim = q.shape
    page_size = k_pages.shape[1]
    group = num_heads // k_pages.shape[2]
    out = np.zeros_like(q)
    for r in range(len(kv_lens)):
        n = int(kv_lens[r])
        slots = np.arange(n)
        pages = page_table[r, slots // page_size]
        k = k_pages[pages, slots % page_size]  # [n, kvh, d]
        v = v_pages[pages, slots % page_size]
        valid = slot_valid[pages, slots % page_size]
        for t in range(cu_q_lens[r], cu_q_lens[r + 1]):
            allowed = valid & (mask[t, :n] if mask is not None else slots <= q_slots[t])
            if not allowed.any():
                continue
            for h in range(num_heads):
                s = (k[:, h // group] @ q[t, h].astype(np.float64)) * scale
                s = np.where(allowed, s, -np.inf)
                w = np.exp(s - s.max())
                w /= w.sum()
                out[t, h] = w @ v[:, h // group]
    return out


# Array sizes are padded to fixed maxima so hypothesis examples share a few compilations.
MAX_TOKENS, MAX_REQUESTS, MAX_PAGES, NUM_PAGES = 24, 5, 4, 12


@st.composite
def ragged_batches(draw):
    page_size = draw(st.sampled_from([1, 2, 4]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3]))
    head_dim = 8
    num_requests = draw(st.integers(1, 4))
    kv_lens, q_lens, tables = [], [], []
    for _ in range(num_requests):
        n_pages = draw(st.integers(1, MAX_PAGES))
        last = draw(st.integers(1, page_size))  # partial last pages included
        kv_len = (n_pages - 1) * page_size + last
        kv_lens.append(kv_len)
        q_lens.append(draw(st.integers(0, min(kv_len, MAX_TOKENS // 4))))
        pages = draw(st.lists(st.integers(0, NUM_PAGES - 1), min_size=n_pages, max_size=n_pages))
        tables.append(pages + [0] * (MAX_PAGES - n_pages))
    while len(kv_lens) < MAX_REQUESTS:  # padding requests with kv_len 0
        kv_lens.append(0)
        q_lens.append(0)
        tables.append([0] * MAX_PAGES)
    use_mask = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(page_size=page_size, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                num_pages=NUM_PAGES, kv_lens=kv_lens, q_lens=q_lens, tables=tables,
                pad_tokens=MAX_TOKENS - sum(q_lens), use_mask=use_mask, seed=seed)


def make_inputs(spec):
    rng = np.random.default_rng(spec["seed"])
    ps, kvh, d = spec["page_size"], spec["num_kv_heads"], spec["head_dim"]
    heads = kvh * spec["group"]
    kv_lens = np.array(spec["kv_lens"], np.int32)
    q_lens = np.array(spec["q_lens"], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    total = int(cu[-1]) + spec["pad_tokens"]
    q_slots = np.zeros(total, np.int32)
    for r in range(len(kv_lens)):
        q_slots[cu[r]:cu[r + 1]] = np.arange(kv_lens[r] - q_lens[r], kv_lens[r])
    table = np.array(spec["tables"], np.int32)
    max_slots = table.shape[1] * ps
    mask = rng.random((total, max_slots)) < 0.6 if spec["use_mask"] else None
    return dict(
        q=rng.standard_normal((total, heads, d)).astype(np.float32),
        k_pages=rng.standard_normal((spec["num_pages"], ps, kvh, d)).astype(np.float32),
        v_pages=rng.standard_normal((spec["num_pages"], ps, kvh, d)).astype(np.float32),
        slot_valid=rng.random((spec["num_pages"], ps)) < 0.8,
        page_table=table, kv_lens=kv_lens, cu_q_lens=cu, q_slots=q_slots, mask=mask,
        scale=1.0 / np.sqrt(d),
    )


_jitted_reference = jax.jit(paged_attention_reference, static_argnames="scale")


def run_reference(x, fn=_jitted_reference):
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    return np.asarray(fn(
        jnp.asarray(x["q"]), jnp.asarray(x["k_pages"]), jnp.asarray(x["v_pages"]),
        jnp.asarray(x["slot_valid"]), jnp.asarray(x["page_table"]), jnp.asarray(x["kv_lens"]),
        jnp.asarray(x["cu_q_lens"]), jnp.asarray(x["q_slots"]), mask, scale=x["scale"]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_reference_matches_naive_dense_attention(spec):
    x = make_inputs(spec)
    got = run_reference(x)
    want = naive_attention(x["q"], x["k_pages"], x["v_pages"], x["slot_valid"], x["page_table"],
                           x["kv_lens"], x["cu_q_lens"], x["q_slots"], x["mask"], x["scale"])
    real = int(x["cu_q_lens"][-1])
    assert got.shape == x["q"].shape and got.dtype == np.float32
    np.testing.assert_allclose(got[:real], want[:real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(got).all()


def test_token_without_attendable_slot_outputs_zeros():
    spec = dict(page_size=4, num_kv_heads=1, group=2, head_dim=4, num_pages=3, kv_lens=[3],
                q_lens=[3], tables=[[1]], pad_tokens=0, use_mask=False, seed=0)
    x = make_inputs(spec)
    x["slot_valid"][1, 0] = False  # token 0 may only see slot 0
    x["slot_valid"][1, 1:3] = True
    got = run_reference(x)
    assert np.all(got[0] == 0)
    assert np.abs(got[1]).sum() > 0


def test_chunked_path_matches_single_chunk(monkeypatch):
    spec = dict(page_size=2, num_kv_heads=2, group=2, head_dim=4, num_pages=8, kv_lens=[7, 5],
                q_lens=[7, 3], tables=[[3, 1, 6, 0], [2, 5, 7, 0]], pad_tokens=3, use_mask=True, seed=5)
    x = make_inputs(spec)
    per_token = reference_module.paged_attention_per_token
    whole = run_reference(x, per_token)
    # Forces chunks of 2 tokens (13 tokens -> 7 chunks with padding) on the per-token path.
    monkeypatch.setattr(reference_module, "_GATHER_BUDGET", 2 * 8 * 2 * 4)
    chunked = run_reference(x, per_token)
    np.testing.assert_allclose(chunked[:10], whole[:10], atol=1e-6)


def test_dispatcher_uses_reference_on_cpu_and_honours_override(monkeypatch):
    monkeypatch.delenv("PIE_ATTENTION", raising=False)
    assert resolve_attention(None) is paged_attention_reference
    monkeypatch.setenv("PIE_ATTENTION", "reference")
    spec = dict(page_size=4, num_kv_heads=1, group=1, head_dim=4, num_pages=2, kv_lens=[5],
                q_lens=[2], tables=[[0, 1]], pad_tokens=0, use_mask=False, seed=1)
    x = make_inputs(spec)
    np.testing.assert_allclose(run_reference(x, paged_attention), run_reference(x), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("PIE_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="unknown attention implementation 'bogus'"):
        resolve_attention(None)
