"""Weight-only int8 (``--weights int8``, ``engine_jax.quant``): exact on the weights it stores, close to float32.

Two questions, kept apart. Does the int8 step compute what its weights say? Then it equals a
float32 step on the dequantised weights (``values * scale``) to float rounding, greedy tokens
included. How far is that from the original float32 model? Quantising moves a weight by at most
half a step, ``max|w| / 254`` of its output channel; the log-probs move by a few times as much as
storing the same weights in bfloat16 does (what accelerators run by default): measured 2.8x
(Llama), 3.7x (Qwen2), 4.5x (Gemma 3) on these models, so the bound is 8x. A wrong scale axis or a
dropped scale moves them by orders of magnitude more. (Real models: benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from engine_jax import quant
from engine_jax.engine import Engine
from engine_jax.generate import generate
from engine_jax.options import EngineOptions
from engine_jax.weights import load_hf_checkpoint
from tests.engine.engine_utils import request, step_logprobs
from tests.engine.test_model_vs_hf import prompt_tokens
from tests.helpers.engine_models import TestModel, load_test_model

FAMILIES = ("llama", "qwen2", "gemma3")  # tied and untied LM heads, both model families
BF16_FACTOR = 8.0


@pytest.fixture(scope="module")
def int8_model(small_model_dir):
    loaded: dict[str, TestModel] = {}

    def get(family: str) -> TestModel:
        if family not in loaded:
            loaded[family] = load_test_model(small_model_dir(family), weights="int8")
        return loaded[family]

    return get


def dequantised(model: TestModel) -> TestModel:
    """The same model with every int8 weight replaced by the float32 matrix it stands for."""
    import jax

    params = jax.tree.map(lambda w: quant.dequantize(w) if isinstance(w, quant.QuantizedWeight) else w,
                          model.params, is_leaf=lambda w: isinstance(w, quant.QuantizedWeight))
    return TestModel(model.name, model.config, params, model.tokenizer, model.hf_config)


def prefill_and_decode(model: TestModel, tokens: list[int]) -> np.ndarray:
    """Log-probs ``[len(tokens), vocab]``: the prompt but its last token in one step, then that token."""
    engine = Engine(model, page_size=16, num_pages=8)
    pages = engine.pool.alloc(2)
    n = len(tokens)
    first = step_logprobs(engine, request(engine, tokens[:-1], range(n - 1), pages, n - 1))
    last = step_logprobs(engine, request(engine, tokens[-1:], [n - 1], pages, n))
    return np.concatenate([first, last])


def test_quantize_keeps_a_scale_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 3, 5)).astype(np.float32)
    w[:, 1, 2] = 0.0  # an all-zero channel quantises to zeros, not NaN
    q = quant.quantize(w, (0,))
    values, scale = np.asarray(q.values), np.asarray(q.scale)
    assert values.dtype == np.int8 and q.dtype == np.float32 and scale.shape == (1, 3, 5)
    assert np.abs(values).max(axis=0)[np.arange(3) != 1].min() == 127  # every channel uses its range
    assert not values[:, 1, 2].any() and np.isfinite(scale).all()
    assert (np.abs(np.asarray(quant.dequantize(q)) - w) <= scale / 2 * (1 + 1e-6)).all()
    x = rng.normal(size=(4, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(quant.einsum("th,hkd->tkd", x, q)),
                               np.einsum("th,hkd->tkd", x, np.asarray(quant.dequantize(q))), rtol=1e-5, atol=1e-5)
    table = quant.quantize(w.reshape(48, 15), (1,))  # an embedding: a scale per row, lookups and tied head
    assert table.scale.shape == (48, 1)
    rows = np.array([3, 0, 47])
    np.testing.assert_allclose(np.asarray(quant.take_rows(table, rows)),
                               np.asarray(quant.dequantize(table))[rows], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(quant.matmul_transposed(x[:, :15], table)),
                               x[:, :15] @ np.asarray(quant.dequantize(table)).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_step_equals_float_on_its_dequantised_weights(family, int8_model):
    model = int8_model(family)
    layer = model.params.layers[0]
    assert all(isinstance(getattr(layer, f), quant.QuantizedWeight) for f in quant.QUANTIZED_LAYER_FIELDS)
    assert isinstance(model.params.embed, quant.QuantizedWeight)
    assert (model.params.lm_head is None) == model.config.tie_word_embeddings
    tokens = prompt_tokens(model, 12)
    got, want = prefill_and_decode(model, tokens), prefill_and_decode(dequantised(model), tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_int8_greedy_decoding_equals_float_on_its_dequantised_weights(int8_model):
    """The default model's family (Llama, tied head), several prompts, tokens drawn by the engine's
    own loop (on CPU with the transposed int8 head copy it makes for tied models)."""
    model = int8_model("llama")
    prompts = [model.tokenizer.encode(t) for t in ("The quick brown fox", "Once upon a time", "def f(x):", "1, 2, 3,")]
    runs = [generate(Engine(m, page_size=16, num_pages=16), prompts, 8) for m in (model, dequantised(model))]
    assert runs[0] == runs[1]
    assert isinstance(Engine(model, page_size=16, num_pages=4).params.lm_head, quant.QuantizedWeight)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_log_probs_stay_near_float32(family, int8_model, family_models, small_model_dir):
    """Against float32, within BF16_FACTOR x the error of the same weights rounded to bfloat16."""
    _, model = family_models(family)
    tokens = prompt_tokens(model, 12)
    want = prefill_and_decode(model, tokens)
    int8_error = np.abs(prefill_and_decode(int8_model(family), tokens) - want).max()
    _, state = load_hf_checkpoint(small_model_dir(family))
    rounded = {k: np.asarray(v).astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in state.items()}
    from engine_jax.families import params_from_state_dict

    bf16 = TestModel(model.name, model.config, params_from_state_dict(model.config, rounded, np.float32),
                     model.tokenizer)
    bf16_error = np.abs(prefill_and_decode(bf16, tokens) - want).max()
    assert 0 < int8_error <= BF16_FACTOR * bf16_error, (int8_error, bf16_error)


def test_weights_option_is_checked():
    assert EngineOptions(weights="int8").weights == "int8"
    with pytest.raises(ValueError, match="--weights must be one of float, int8"):
        EngineOptions(weights="int4")
