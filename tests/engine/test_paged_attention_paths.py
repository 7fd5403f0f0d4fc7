"""The two paths of the jnp paged attention (per token, by request) against each other and naive dense attention.

Each path is forced by calling it directly, so both are covered whatever
``use_by_request`` picks; the by-request path is also run with small jobs
(``chunk``) and K/V blocks (``block_pages``) so that requests span several
jobs, jobs span several blocks (the online softmax) and a page table that is
not a whole number of blocks gets padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_jax.paged_attention import reference
from engine_jax.paged_attention.reference import (
    paged_attention_by_request,
    paged_attention_per_token,
    paged_attention_reference,
    use_by_request,
)
from tests.engine.test_paged_attention_reference import naive_attention

# Fixed array maxima so hypothesis examples share compilations.
MAX_TOKENS, MAX_REQUESTS, MAX_PAGES, NUM_PAGES, HEAD_DIM = 32, 4, 6, 16, 8


@st.composite
def ragged_batches(draw):
    """Random ragged batch: partial last pages, prefixes, empty requests, padding requests and tokens."""
    page_size = draw(st.sampled_from([1, 2, 3, 4]))
    num_kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3]))
    num_requests = draw(st.integers(1, MAX_REQUESTS))
    kv_lens, q_lens, tables = [], [], []
    budget = MAX_TOKENS
    for _ in range(num_requests):
        n_pages = draw(st.integers(1, MAX_PAGES))
        last = draw(st.integers(1, page_size))
        kv_len = (n_pages - 1) * page_size + last
        q_len = draw(st.integers(0, min(kv_len, budget)))
        budget -= q_len
        kv_lens.append(kv_len)
        q_lens.append(q_len)
        # Random physical pages (distinct within a request; requests may share pages, as forks do).
        pages = draw(st.permutations(range(NUM_PAGES)))[:n_pages]
        tables.append(list(pages) + [0] * (MAX_PAGES - n_pages))
    num_padding_requests = draw(st.integers(0, MAX_REQUESTS - num_requests))
    for _ in range(num_padding_requests):
        kv_lens.append(0)
        q_lens.append(0)
        tables.append([0] * MAX_PAGES)
    return dict(
        page_size=page_size, num_kv_heads=num_kv_heads, group=group,
        kv_lens=kv_lens, q_lens=q_lens, tables=tables,
        pad_tokens=draw(st.integers(0, MAX_TOKENS - sum(q_lens))),
        mask=draw(st.sampled_from(["causal", "random", "sparse"])),
        valid_fraction=draw(st.sampled_from([1.0, 0.8, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(spec):
    rng = np.random.default_rng(spec["seed"])
    ps, kvh = spec["page_size"], spec["num_kv_heads"]
    heads = kvh * spec["group"]
    kv_lens = np.array(spec["kv_lens"], np.int32)
    q_lens = np.array(spec["q_lens"], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    total = int(cu[-1]) + spec["pad_tokens"]
    q_slots = np.zeros(total, np.int32)
    for r in range(len(kv_lens)):
        q_slots[cu[r]:cu[r + 1]] = np.arange(kv_lens[r] - q_lens[r], kv_lens[r])
    if spec["pad_tokens"]:  # padding tokens carry arbitrary slots
        q_slots[cu[-1]:] = rng.integers(0, MAX_PAGES * ps, spec["pad_tokens"])
    table = np.array(spec["tables"], np.int32)
    max_slots = table.shape[1] * ps
    if spec["mask"] == "causal":
        mask = None
    else:
        mask = rng.random((total, max_slots)) < (0.6 if spec["mask"] == "random" else 0.1)
    return dict(
        q=rng.standard_normal((total, heads, HEAD_DIM)).astype(np.float32),
        k_pages=rng.standard_normal((NUM_PAGES, ps, kvh, HEAD_DIM)).astype(np.float32),
        v_pages=rng.standard_normal((NUM_PAGES, ps, kvh, HEAD_DIM)).astype(np.float32),
        slot_valid=rng.random((NUM_PAGES, ps)) < spec["valid_fraction"],
        page_table=table, kv_lens=kv_lens, cu_q_lens=cu, q_slots=q_slots, mask=mask,
        scale=1.0 / np.sqrt(HEAD_DIM),
    )


@functools.lru_cache(maxsize=None)
def jitted(path: str, chunk: int | None = None, block_pages: int | None = None):
    if path == "per_token":
        fn = paged_attention_per_token
    elif path == "by_request":
        fn = functools.partial(paged_attention_by_request, chunk=chunk, block_pages=block_pages)
    else:
        fn = paged_attention_reference
    return jax.jit(fn, static_argnames="scale")


def run(x, fn):
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    return np.asarray(fn(
        jnp.asarray(x["q"]), jnp.asarray(x["k_pages"]), jnp.asarray(x["v_pages"]),
        jnp.asarray(x["slot_valid"]), jnp.asarray(x["page_table"]), jnp.asarray(x["kv_lens"]),
        jnp.asarray(x["cu_q_lens"]), jnp.asarray(x["q_slots"]), mask, scale=x["scale"]))


def naive(x):
    return naive_attention(x["q"], x["k_pages"], x["v_pages"], x["slot_valid"], x["page_table"],
                           x["kv_lens"], x["cu_q_lens"], x["q_slots"], x["mask"], x["scale"])


def no_attendable_slot(x) -> np.ndarray:
    """bool[real tokens]: tokens that may attend to nothing (their output must be zeros)."""
    ps = x["k_pages"].shape[1]
    out = []
    for r in range(len(x["kv_lens"])):
        n = int(x["kv_lens"][r])
        slots = np.arange(n)
        valid = x["slot_valid"][x["page_table"][r, slots // ps], slots % ps]
        for t in range(x["cu_q_lens"][r], x["cu_q_lens"][r + 1]):
            rule = x["mask"][t, :n] if x["mask"] is not None else slots <= x["q_slots"][t]
            out.append(not (valid & rule).any())
    return np.array(out, bool)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches(), st.sampled_from([None, 1, 2, 4, 8]), st.sampled_from([None, 1, 2, 4]))
def test_paths_match_each_other_and_naive_dense_attention(spec, chunk, block_pages):
    x = make_inputs(spec)
    real = int(x["cu_q_lens"][-1])
    want = naive(x)
    per_token = run(x, jitted("per_token"))
    by_request = run(x, jitted("by_request", chunk, block_pages))
    for got in (per_token, by_request):
        assert got.shape == x["q"].shape and got.dtype == np.float32
        assert np.isfinite(got).all()  # padding rows included
        np.testing.assert_allclose(got[:real], want[:real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(by_request[:real], per_token[:real], atol=1e-5, rtol=1e-5)
    empty = no_attendable_slot(x)
    assert np.all(per_token[:real][empty] == 0) and np.all(by_request[:real][empty] == 0)
    # The by-request path writes no job for padding rows past cu_q_lens[-1].
    assert np.all(by_request[real:] == 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches())
def test_dispatcher_equals_both_paths(spec):
    x = make_inputs(spec)
    real = int(x["cu_q_lens"][-1])
    got = run(x, jitted("auto"))
    np.testing.assert_allclose(got[:real], run(x, jitted("per_token"))[:real], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[:real], run(x, jitted("by_request"))[:real], atol=1e-5, rtol=1e-5)


def prefill_spec(**overrides):
    spec = dict(page_size=4, num_kv_heads=2, group=3, kv_lens=[22, 9, 0, 0], q_lens=[22, 9, 0, 0],
                tables=[[5, 2, 9, 0, 11, 3], [7, 1, 4, 0, 0, 0], [0] * 6, [0] * 6],
                pad_tokens=1, mask="causal", valid_fraction=1.0, seed=3)
    spec.update(overrides)
    return spec


@pytest.mark.parametrize("chunk,block_pages", [(None, None), (1, 1), (4, 1), (8, 4), (32, 2)])
def test_long_prefill_many_jobs_and_blocks(chunk, block_pages):
    """Two prompts from slot 0 (one with a prefix-less partial last page), causal and masked."""
    for mask in ("causal", "random"):
        x = make_inputs(prefill_spec(mask=mask))
        want = naive(x)
        got = run(x, jitted("by_request", chunk, block_pages))
        np.testing.assert_allclose(got[:31], want[:31], atol=1e-5, rtol=1e-5)


def test_token_without_attendable_slot_outputs_zeros_on_both_paths():
    x = make_inputs(prefill_spec(valid_fraction=1.0))
    x["slot_valid"][5, 0] = False  # request 0's slot 0: its first token sees nothing
    x["slot_valid"][7, :] = False  # request 1's first page: its first 4 tokens see nothing
    for fn in (jitted("per_token"), jitted("by_request"), jitted("by_request", 2, 1)):
        got = run(x, fn)
        assert np.all(got[0] == 0) and np.abs(got[1]).sum() > 0
        assert np.all(got[22:26] == 0) and np.abs(got[26]).sum() > 0


def test_rule_picks_by_request_for_prefill_and_per_token_for_decode(monkeypatch):
    assert use_by_request(128, 1) and use_by_request(2048, 8) and use_by_request(32, 16)
    assert not use_by_request(16, 16) and not use_by_request(1, 1) and not use_by_request(8, 8)
    calls = []
    monkeypatch.setattr(reference, "paged_attention_by_request", lambda *a, **k: calls.append("by_request"))
    monkeypatch.setattr(reference, "paged_attention_per_token", lambda *a, **k: calls.append("per_token"))
    prefill = make_inputs(prefill_spec())  # 32 tokens, 4 requests
    run(prefill, paged_attention_reference)
    decode = make_inputs(dict(prefill_spec(), q_lens=[1, 1, 0, 0], pad_tokens=2))  # 4 tokens, 4 requests
    run(decode, paged_attention_reference)
    assert calls == ["by_request", "per_token"]


def test_chunk_rule():
    # At most tokens / requests, a power of two, capped by the job and score budgets.
    assert reference.by_request_chunk(2048, 8, 9, 256) == 256
    assert reference.by_request_chunk(1024, 1, 9, 256) == reference._MAX_CHUNK
    assert reference.by_request_chunk(32, 16, 9, 160) == 2
    assert reference.by_request_chunk(48, 4, 9, 16) == 8
    assert reference.by_request_chunk(4096, 1, 64, 256) == 64  # 64 heads x 256 slots: score budget
    assert reference.by_request_chunk(1, 4, 9, 16) == 1


def test_bfloat16_inputs_keep_dtype_and_match():
    x = make_inputs(prefill_spec())
    args = [jnp.asarray(x[k]) for k in ("q", "k_pages", "v_pages")]
    args = [a.astype(jnp.bfloat16) for a in args]
    rest = [jnp.asarray(x[k]) for k in ("slot_valid", "page_table", "kv_lens", "cu_q_lens", "q_slots")]
    a = paged_attention_per_token(*args, *rest, None, scale=x["scale"])
    b = paged_attention_by_request(*args, *rest, None, scale=x["scale"], chunk=4, block_pages=2)
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a[:31], np.float32), np.asarray(b[:31], np.float32), atol=2e-2)
