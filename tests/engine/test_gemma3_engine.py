"""Gemma 3 in the engine beyond plain prompts: slot positions follow copies (forks), windows combine
with custom masks and masked slots, and positions rather than slots decide the window."""

from __future__ import annotations

import numpy as np

from engine_jax.engine import Engine
from tests.engine.engine_utils import hf_logprobs, request, step_logprobs
from tests.engine.test_model_vs_hf import TOL, prompt_tokens
from tests.helpers.hf_models import GEMMA3_WINDOW


def test_copied_pages_carry_their_positions(family_models):
    """A fork copies the prefix's pages; decoding on the copy equals decoding on the original,
    which needs the slots' positions copied with their K/V (the local layers' window reads them)."""
    hf, model = family_models("gemma3")
    tokens = prompt_tokens(model, 21)
    engine = Engine(model, page_size=4, num_pages=16)
    original = engine.pool.alloc(6)
    engine.step([request(engine, tokens[:20], range(20), original, 20, with_logprobs=False)])
    fork = engine.pool.alloc(6)
    for src, dst in zip(original[:5], fork[:5]):
        engine.copy_page(src, dst)
    on_fork = step_logprobs(engine, request(engine, tokens[20:21], [20], fork, 21))
    on_original = step_logprobs(engine, request(engine, tokens[20:21], [20], original, 21))
    np.testing.assert_allclose(on_fork, on_original, rtol=0, atol=1e-5)
    assert np.abs(on_fork - hf_logprobs(hf, tokens)[20:]).max() <= TOL


def test_custom_mask_equal_to_causal_combines_with_the_window(family_models):
    _, model = family_models("gemma3")
    tokens = prompt_tokens(model, 20)
    engine = Engine(model, page_size=4, num_pages=16)
    pages = engine.pool.alloc(5)
    engine.step([request(engine, tokens[:12], range(12), pages, 12, with_logprobs=False)])
    plain = step_logprobs(engine, request(engine, tokens[12:20], range(12, 20), pages, 20))
    causal = np.tril(np.ones((8, 20), bool), k=12)
    masked = step_logprobs(engine, request(engine, tokens[12:20], range(12, 20), pages, 20, mask=causal))
    np.testing.assert_allclose(masked, plain, rtol=0, atol=1e-5)


def test_masked_slots_inside_the_window_equal_dropping_them(family_models):
    """Marking slots invalid == transformers without those tokens, when every query's window
    (by position) and transformers' window (by index in the shorter sequence) cover the same tokens."""
    hf, model = family_models("gemma3")
    tokens = prompt_tokens(model, 10)
    engine = Engine(model, page_size=4, num_pages=8)
    pages = engine.pool.alloc(3)
    # The dropped tokens are written last, then masked before anything attends to them from later.
    engine.step([request(engine, tokens[:3], range(3), pages, 3, with_logprobs=False)])
    engine.set_valid(pages[0], 1, 2, False)  # drop tokens 1 and 2
    got = step_logprobs(engine, request(engine, tokens[3:6], range(3, 6), pages, 6))
    kept = [0, 3, 4, 5]  # tokens 3..5 see back to position 0 (window 6): every kept one
    assert kept[-1] - kept[0] < GEMMA3_WINDOW
    want = hf_logprobs(hf, [tokens[i] for i in kept], positions=kept)[1:]
    assert np.abs(got - want).max() <= TOL


def test_window_is_by_position_not_by_slot(family_models):
    """The same tokens in the same slots at spread-out positions: the local layers see less."""
    _, model = family_models("gemma3")
    tokens = prompt_tokens(model, 8)
    results = []
    for positions in (list(range(8)), [0, 1, 2, 3, 10, 11, 12, 13]):
        engine = Engine(model, page_size=4, num_pages=4)
        pages = engine.pool.alloc(2)
        results.append(step_logprobs(engine, request(engine, tokens, positions, pages, 8)))
    # Token 7 at position 13 no longer sees tokens 0..3 (13 - 3 >= 6) in local layers.
    assert np.abs(results[0][7] - results[1][7]).max() > 1e-3
