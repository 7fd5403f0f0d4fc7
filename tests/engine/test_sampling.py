"""On-device samplers: direct checks on synthetic logits, and through Engine.step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_jax.batch import (
    MAX_SAMPLE_LOGPROBS,
    Distribution,
    EngineInputError,
    ForwardRequest,
    Logprobs,
    Sample,
    SampledToken,
)
from engine_jax.engine import Engine
from engine_jax.sampling import first_argmax, sample_tokens, token_logprobs, top_k_distribution

V = 64


@partial(jax.jit, static_argnames=("stochastic", "sort_width"))
def _sample(logits, temperature, top_k, top_p, min_p, seeds, allowed, *, stochastic, sort_width):
    keys = jax.vmap(jax.random.key)(seeds) if stochastic else None
    return sample_tokens(logits, temperature, top_k, top_p, min_p, keys, allowed,
                         stochastic=stochastic, sort_width=sort_width)


def draw(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, allowed=None, seeds=None, sort_width=None):
    """Samples every row of ``logits`` with the same parameters and row-specific seeds."""
    rows, vocab = logits.shape
    full = lambda value, dtype: jnp.full((rows,), value, dtype)
    if sort_width is None:
        sort_width = vocab if top_p < 1 else (top_k if top_k else 0)
    seeds = jnp.arange(rows, dtype=jnp.uint32) if seeds is None else jnp.asarray(seeds, jnp.uint32)
    return np.asarray(_sample(
        jnp.asarray(logits, jnp.float32), full(temperature, jnp.float32), full(top_k, jnp.int32),
        full(top_p, jnp.float32), full(min_p, jnp.float32), seeds,
        None if allowed is None else jnp.asarray(allowed),
        stochastic=temperature > 0, sort_width=sort_width))


def probs_of(logits, temperature=1.0):
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((16, V)).astype(np.float32)
    np.testing.assert_array_equal(draw(logits, temperature=0.0), logits.argmax(-1))


_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.data())
def test_first_argmax_is_jnp_argmax(rows, vocab, data):
    """Ties take the first index, a NaN wins (the first one), all -inf gives 0: exactly jnp.argmax."""
    values = data.draw(st.lists(st.one_of(_SPECIAL, st.floats(-4, 4, width=32)),
                                min_size=rows * vocab, max_size=rows * vocab))
    logits = jnp.asarray(np.array(values, np.float32).reshape(rows, vocab))
    got = np.asarray(jax.jit(first_argmax)(logits))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(logits, axis=-1)))


def test_top_k_one_is_greedy():
    logits = np.random.default_rng(1).standard_normal((32, V)).astype(np.float32)
    np.testing.assert_array_equal(draw(logits, temperature=1.5, top_k=1), logits.argmax(-1))


def test_temperature_sampling_follows_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2, 1.5], np.float32)
    n = 4000
    tokens = draw(np.tile(logits, (n, 1)), temperature=0.7)
    freq = np.bincount(tokens, minlength=8) / n
    np.testing.assert_allclose(freq, probs_of(logits, 0.7), atol=0.03)


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float32))
    tokens = draw(np.tile(logits, (2000, 1)), top_p=0.75)
    # 0.4 + 0.25 = 0.65 < 0.75, so the third token is needed; the fourth is not.
    assert set(tokens.tolist()) == {0, 1, 2}
    freq = np.bincount(tokens, minlength=3)[:3] / 2000
    np.testing.assert_allclose(freq, np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.04)


def test_top_p_applies_after_top_k():
    logits = np.log(np.array([0.35, 0.3, 0.25, 0.1], np.float32))
    # Renormalised over the top 2 the first token has 0.54 >= 0.5 on its own; over all four it has 0.35.
    tokens = draw(np.tile(logits, (500, 1)), top_k=2, top_p=0.5)
    assert set(tokens.tolist()) == {0}
    tokens = draw(np.tile(logits, (500, 1)), top_p=0.5)
    assert set(tokens.tolist()) == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32))
    tokens = draw(np.tile(logits, (1500, 1)), min_p=0.19)  # keeps p >= 0.095
    assert set(tokens.tolist()) == {0, 1, 2}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    top_k=st.sampled_from([0, 1, 5, V]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]),
    min_p=st.sampled_from([0.0, 0.05, 0.5]),
    density=st.floats(0.01, 0.5),
)
def test_filters_and_allowed_mask_are_never_violated(seed, temperature, top_k, top_p, min_p, density):
    rng = np.random.default_rng(seed)
    rows = 8
    logits = (rng.standard_normal((rows, V)) * 3).astype(np.float32)
    allowed = rng.random((rows, V)) < density
    allowed[np.arange(rows), rng.integers(0, V, rows)] = True
    tokens = draw(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, allowed=allowed,
                  seeds=rng.integers(0, 2**32, rows), sort_width=V if top_p < 1 else (8 if top_k else 0))
    for r in range(rows):
        t = tokens[r]
        assert allowed[r, t]
        masked = np.where(allowed[r], logits[r], -np.inf)
        if temperature == 0:
            assert t == masked.argmax()
            continue
        order = np.argsort(-masked, kind="stable")
        rank = int(np.nonzero(order == t)[0][0])
        if top_k:
            assert rank < top_k
        p = probs_of(np.where(np.arange(V) < (top_k or V), masked[order], -np.inf), temperature)
        assert rank == 0 or p[:rank].sum() < top_p + 1e-5
        full_p = probs_of(masked, temperature)
        assert full_p[t] >= min_p * full_p.max() - 1e-6


def test_distribution_is_sorted_top_k_of_softmax():
    logits = np.random.default_rng(3).standard_normal((4, V)).astype(np.float32)
    temperature = jnp.array([1.0, 0.5, 2.0, 1.0])
    ids, probs = jax.jit(top_k_distribution, static_argnums=2)(jnp.asarray(logits), temperature, 10)
    ids, probs = np.asarray(ids), np.asarray(probs)
    for r in range(4):
        p = probs_of(logits[r], float(temperature[r]))
        np.testing.assert_array_equal(ids[r], np.argsort(-p)[:10])
        np.testing.assert_allclose(probs[r], p[ids[r]], rtol=1e-5)
        assert np.all(np.diff(probs[r]) <= 0) and probs[r].sum() <= 1 + 1e-6


def test_logprobs_are_log_softmax():
    logits = np.random.default_rng(4).standard_normal((3, V)).astype(np.float32) * 4
    ids = np.array([[0, 5, 63], [1, 1, 2], [10, 20, 30]], np.int32)
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
    z = logits.astype(np.float64)
    log_softmax = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, np.take_along_axis(log_softmax, ids, -1), atol=1e-5)


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def engine(tiny_llama_model):
    return Engine(tiny_llama_model, page_size=4, num_pages=32)


def run_samples(engine, outputs):
    """One 5-token prompt on fresh pages with the given output requests at its last token."""
    pages = engine.pool.alloc(2)
    try:
        req = ForwardRequest(tokens=[5, 6, 7, 8, 9], positions=range(5), pages=pages, last_page_len=1,
                             outputs=outputs)
        return engine.step([req])[0]
    finally:
        engine.pool.free(pages)


def test_same_seed_same_token_different_seeds_differ(engine):
    seeded = [Sample(index=4, temperature=1.5, seed=s) for s in range(40)]
    first = run_samples(engine, seeded)
    second = run_samples(engine, seeded)
    assert first == second
    assert len(set(first)) > 5  # 40 seeds over a 384-token vocabulary at high temperature
    big = run_samples(engine, [Sample(index=4, temperature=1.5, seed=2**64 - 1)] * 2)
    assert big[0] == big[1]


def test_unseeded_rows_use_a_fresh_stream_each_step(engine):
    unseeded = [Sample(index=4, temperature=1.5)] * 16
    first, second = run_samples(engine, unseeded), run_samples(engine, unseeded)
    assert first != second
    assert len(set(first)) > 1  # rows within one step differ too


def test_engine_outputs_agree_with_each_other(engine):
    v = engine.config.vocab_size
    allowed = np.zeros(v, bool)
    allowed[[3, 50, 200]] = True
    results = run_samples(engine, [
        Sample(index=4),
        Distribution(index=4, k=5),
        Logprobs(index=4, token_ids=tuple(range(v))),
        Sample(index=4, temperature=0.0, allowed=allowed),
        Sample(index=4, temperature=2.0, allowed=allowed, seed=7),
        Distribution(index=2, k=3, temperature=0.5),
        Logprobs(index=2, token_ids=tuple(range(v))),
        Logprobs(index=4, token_ids=()),
    ])
    greedy, (ids, probs), logprobs, masked_greedy, masked_draw, (ids2, probs2), logprobs2, empty = results
    logprobs = np.array(logprobs)
    assert greedy == int(np.argmax(logprobs)) == ids[0]
    np.testing.assert_allclose(probs, np.exp(logprobs[ids]), rtol=1e-5)
    assert masked_greedy == max([3, 50, 200], key=lambda t: logprobs[t])
    assert masked_draw in (3, 50, 200)
    p2 = np.exp(np.array(logprobs2) / 0.5)
    p2 /= p2.sum()
    np.testing.assert_array_equal(ids2, np.argsort(-p2)[:3])
    np.testing.assert_allclose(probs2, p2[ids2], rtol=1e-4)
    assert empty == []


def test_sampled_token_logprobs_are_the_models_own(engine):
    """A sample with `logprobs` reports its draw's log-probability and the top alternatives under the
    model's own distribution (temperature 1, before `allowed`), whatever it was drawn with."""
    v = engine.config.vocab_size
    allowed = np.zeros(v, bool)
    allowed[[3, 50, 200]] = True
    results = run_samples(engine, [
        Logprobs(index=4, token_ids=tuple(range(v))),
        Sample(index=4, logprobs=5),
        Sample(index=4, temperature=2.0, seed=3, logprobs=0),
        Sample(index=4, temperature=0.0, allowed=allowed, logprobs=2),
        Sample(index=2, logprobs=MAX_SAMPLE_LOGPROBS),
        Sample(index=4),
        Logprobs(index=2, token_ids=tuple(range(v))),
    ])
    full, top5, drawn, masked, wide, plain, full2 = results
    full, full2 = np.array(full), np.array(full2)
    assert isinstance(top5, SampledToken) and plain == top5.token == int(np.argmax(full))
    np.testing.assert_array_equal(top5.top_tokens, np.argsort(-full, kind="stable")[:5])
    np.testing.assert_allclose(top5.top_logprobs, full[top5.top_tokens], atol=1e-5)
    np.testing.assert_allclose(top5.logprob, full[top5.token], atol=1e-5)
    assert drawn.top_tokens == [] and drawn.top_logprobs == []
    np.testing.assert_allclose(drawn.logprob, full[drawn.token], atol=1e-5)
    assert masked.token in (3, 50, 200) and masked.top_tokens == top5.top_tokens[:2]
    np.testing.assert_allclose(masked.logprob, full[masked.token], atol=1e-5)
    assert len(wide.top_tokens) == MAX_SAMPLE_LOGPROBS and wide.token == wide.top_tokens[0]
    np.testing.assert_allclose(wide.top_logprobs, full2[wide.top_tokens], atol=1e-5)


def test_sample_logprobs_beyond_the_cap_are_refused(engine):
    pages = engine.pool.alloc(1)
    try:
        req = ForwardRequest(tokens=[5], positions=[0], pages=pages, last_page_len=1,
                             outputs=[Sample(index=0, logprobs=MAX_SAMPLE_LOGPROBS + 1)])
        with pytest.raises(EngineInputError, match="logprobs=21"):
            engine.step([req])
    finally:
        engine.pool.free(pages)
