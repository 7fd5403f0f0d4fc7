"""The engine's numerics against transformers (float32) on tiny random checkpoints of each family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_jax.engine import Engine
from engine_jax.generate import generate
from tests.engine.engine_utils import hf_logprobs, request, step_logprobs
from tests.helpers.hf_models import ALL_FAMILIES

TOL = 1e-4
TEXT = "Return a new list containing all items from the iterable in ascending order. " \
       "The key argument specifies a one-argument function."


def prompt_tokens(model, n: int | None = None) -> list[int]:
    tokens = model.tokenizer.encode(TEXT)
    return tokens if n is None else tokens[:n]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_prompt_logprobs_match_transformers(family, family_models):
    hf, model = family_models(family)
    engine = Engine(model, page_size=16, num_pages=8)
    tokens = prompt_tokens(model)
    pages = engine.pool.alloc(-(-len(tokens) // 16))
    got = step_logprobs(engine, request(engine, tokens, range(len(tokens)), pages, len(tokens)))
    want = hf_logprobs(hf, tokens)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("page_size", [4, 16])
def test_incremental_decode_through_shuffled_pages(family, page_size, family_models):
    """Prefill a few tokens, then feed the rest in small chunks, with pages in a random physical order."""
    hf, model = family_models(family)
    tokens = prompt_tokens(model, 30)
    engine = Engine(model, page_size=page_size, num_pages=24)
    pool_pages = engine.pool.alloc(24)
    order = np.random.default_rng(page_size).permutation(pool_pages).tolist()
    want = hf_logprobs(hf, tokens)
    got = []
    chunks = [7, 1, 1, 3, 1, 5, 1, 1, 10]
    start = 0
    for size in chunks:
        end = start + size
        got.append(step_logprobs(engine, request(engine, tokens[start:end], range(start, end), order, end)))
        start = end
    assert start == len(tokens)
    assert np.abs(np.concatenate(got) - want).max() <= TOL


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_generation_matches_transformers_generate(family, family_models):
    hf, model = family_models(family)
    engine = Engine(model, page_size=4, num_pages=64)
    prompts = [prompt_tokens(model, 9), prompt_tokens(model, 17)[3:]]
    ours = generate(engine, prompts, max_new_tokens=12)
    for prompt, continuation in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert continuation == out[0, len(prompt):].tolist()
    assert engine.pool.num_free == 64


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_ragged_mixed_batch_equals_each_request_alone(family, family_models):
    """Prefills and decodes of different lengths in one step give the same log-probs as run alone."""
    _, model = family_models(family)
    tokens = prompt_tokens(model)
    engine = Engine(model, page_size=4, num_pages=64)
    v = model.config.vocab_size
    # Three sequences; B and C already hold a prefix from earlier steps.
    a_pages, b_pages, c_pages = engine.pool.alloc(6), engine.pool.alloc(6), engine.pool.alloc(6)
    engine.step([request(engine, tokens[:9], range(9), b_pages, 9, with_logprobs=False),
                 request(engine, tokens[5:17], range(12), c_pages, 12, with_logprobs=False)])
    batch = [
        request(engine, tokens[:13], range(13), a_pages, 13),  # prefill
        request(engine, tokens[9:10], [9], b_pages, 10),  # decode
        request(engine, tokens[17:20], range(12, 15), c_pages, 15),  # chunked prefill
    ]
    together = [np.array(r) for r in engine.step(batch)]

    alone_engine = Engine(model, page_size=4, num_pages=64)
    a2, b2, c2 = alone_engine.pool.alloc(6), alone_engine.pool.alloc(6), alone_engine.pool.alloc(6)
    alone = [step_logprobs(alone_engine, request(alone_engine, tokens[:13], range(13), a2, 13))]
    alone_engine.step([request(alone_engine, tokens[:9], range(9), b2, 9, with_logprobs=False)])
    alone.append(step_logprobs(alone_engine, request(alone_engine, tokens[9:10], [9], b2, 10)))
    alone_engine.step([request(alone_engine, tokens[5:17], range(12), c2, 12, with_logprobs=False)])
    alone.append(step_logprobs(alone_engine, request(alone_engine, tokens[17:20], range(12, 15), c2, 15)))
    for t, a in zip(together, alone):
        assert t.shape == a.shape and t.shape[1] == v
        np.testing.assert_allclose(t, a, atol=1e-5)


def test_custom_mask_equal_to_causal_gives_identical_results(family_models):
    _, model = family_models("qwen2")
    tokens = prompt_tokens(model, 20)
    engine = Engine(model, page_size=4, num_pages=32)
    pages = engine.pool.alloc(8)
    engine.step([request(engine, tokens[:12], range(12), pages, 12, with_logprobs=False)])
    plain = step_logprobs(engine, request(engine, tokens[12:20], range(12, 20), pages, 20))
    causal = np.tril(np.ones((8, 20), bool), k=12)
    masked = step_logprobs(engine, request(engine, tokens[12:20], range(12, 20), pages, 20, mask=causal))
    # Same math through a differently fused program: equal up to float32 rounding.
    np.testing.assert_allclose(masked, plain, rtol=0, atol=1e-5)
    # In a batch with an unmasked request too (the mask path fills causal rows for it).
    other = engine.pool.alloc(3)
    both = engine.step([request(engine, tokens[12:20], range(12, 20), pages, 20, mask=causal),
                        request(engine, tokens[:9], range(9), other, 9)])
    np.testing.assert_allclose(np.array(both[0]), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_masked_slots_equal_dropping_those_tokens(family, family_models):
    """set_valid(False) on slots 3..6 == transformers run without those tokens, positions kept."""
    hf, model = family_models(family)
    tokens = prompt_tokens(model, 24)
    engine = Engine(model, page_size=4, num_pages=16)
    pages = engine.pool.alloc(6)
    # The dropped tokens are written first, then masked before anything attends to them from later.
    engine.step([request(engine, tokens[:7], range(7), pages, 7, with_logprobs=False)])
    engine.set_valid(pages[0], 3, 1, False)
    engine.set_valid(pages[1], 0, 3, False)
    got = step_logprobs(engine, request(engine, tokens[7:24], range(7, 24), pages, 24))
    kept = [i for i in range(24) if not 3 <= i <= 6]
    want = hf_logprobs(hf, [tokens[i] for i in kept], positions=kept)
    assert np.abs(got - want[3:]).max() <= TOL  # rows of tokens 7..23
    # Unmasking restores the full-context result.
    engine.set_valid(pages[0], 3, 1, True)
    engine.set_valid(pages[1], 0, 3, True)
    again = step_logprobs(engine, request(engine, tokens[7:24], range(7, 24), pages, 24))
    assert np.abs(again - hf_logprobs(hf, tokens)[7:]).max() <= TOL


def test_custom_mask_equals_masking_slots(family_models):
    """A mask that hides slots 2..5 from the new tokens == marking those slots invalid."""
    _, model = family_models("llama")
    tokens = prompt_tokens(model, 16)
    results = []
    for use_mask in (True, False):
        engine = Engine(model, page_size=4, num_pages=8)
        pages = engine.pool.alloc(4)
        engine.step([request(engine, tokens[:10], range(10), pages, 10, with_logprobs=False)])
        mask = np.tril(np.ones((6, 16), bool), k=10)
        if use_mask:
            mask[:, 2:6] = False
        else:
            engine.set_valid(pages[0], 2, 2, False)
            engine.set_valid(pages[1], 0, 2, False)
        results.append(step_logprobs(engine, request(engine, tokens[10:16], range(10, 16), pages, 16,
                                                     mask=mask if use_mask else None)))
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-5)
    assert np.abs(results[0] - results[1]).max() < 1e-5


def test_positions_are_independent_of_slots(family_models):
    """Tokens in slots 0..11 at gapped RoPE positions match transformers given those position ids."""
    hf, model = family_models("llama")
    tokens = prompt_tokens(model, 12)
    engine = Engine(model, page_size=4, num_pages=8)
    pages = engine.pool.alloc(3)
    # RoPE only sees position differences, so the gaps (not an offset) are what must matter.
    positions = [0, 1, 2, 7, 8, 20, 21, 22, 40, 41, 90, 91]
    got = step_logprobs(engine, request(engine, tokens, positions, pages, 12))
    want = hf_logprobs(hf, tokens, positions=positions)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - hf_logprobs(hf, tokens)).max() > 1e-3  # the positions really mattered


def test_sliding_window_matches_transformers(small_model_dir, tmp_path):
    """Mistral's sliding window (via the mask path) agrees with transformers once sequences exceed it."""
    import json

    from tests.helpers.engine_models import load_test_model
    from tests.helpers.hf_models import load_hf_model

    source = small_model_dir("mistral")
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["sliding_window"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf, model = load_hf_model(tmp_path), load_test_model(tmp_path)
    assert model.config.sliding_window == 8
    tokens = prompt_tokens(model, 20)
    engine = Engine(model, page_size=4, num_pages=8)
    pages = engine.pool.alloc(5)
    engine.step([request(engine, tokens[:11], range(11), pages, 11, with_logprobs=False)])
    got = step_logprobs(engine, request(engine, tokens[11:20], range(11, 20), pages, 20))
    want = hf_logprobs(hf, tokens)[11:]
    assert np.abs(got - want).max() <= TOL
