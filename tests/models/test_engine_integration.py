"""The real SmolLM2 GGUF through our loader and engine, against transformers' GGUF model."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PAGE = 16


@pytest.fixture(scope="module")
def engine(smollm_gguf):
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model

    return Engine(load_model(str(smollm_gguf)), page_size=PAGE, num_pages=32)


def _hf_logprobs(hf_model, ids):
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):\n    return"])
def test_last_position_logprobs_match_transformers(engine, hf_gguf_model, prompt):
    from engine_jax.batch import ForwardRequest, Logprobs

    ids = engine.tokenizer.encode(prompt)
    n_pages = math.ceil(len(ids) / PAGE)
    pages = engine.pool.alloc(n_pages)
    try:
        vocab = engine.config.vocab_size
        request = ForwardRequest(
            tokens=ids, positions=list(range(len(ids))), pages=pages,
            last_page_len=len(ids) - (n_pages - 1) * PAGE,
            outputs=[Logprobs(index=len(ids) - 1, token_ids=tuple(range(vocab)))],
        )
        [[ours]] = engine.step([request])
    finally:
        engine.pool.free(pages)
    theirs = _hf_logprobs(hf_gguf_model, ids)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert int(np.argmax(ours)) == int(np.argmax(theirs))


def test_greedy_generation_says_paris_like_transformers(engine, hf_gguf_model):
    import torch

    from engine_jax.generate import generate

    tok = engine.tokenizer
    prompt = tok.encode("The capital of France is")
    [ours] = generate(engine, [prompt], max_new_tokens=8, stop_token_ids=tok.eos_token_ids)
    text = tok.decode(ours)
    assert "Paris" in text, text
    with torch.no_grad():
        theirs = hf_gguf_model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_ids
        )[0, len(prompt):].tolist()
    assert ours == theirs


def test_chat_prompt_answers_paris(engine):
    from engine_jax.generate import generate

    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    [ours] = generate(engine, [prompt], max_new_tokens=24, stop_token_ids=tok.eos_token_ids)
    assert "Paris" in tok.decode(ours, skip_special_tokens=True)
