"""load_model: registry names, GGUF files, HF directories and converted directories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_jax.checkpoint import convert
from engine_jax.loader import LoadedModel, ModelNotFoundError, default_dtype, load_model
from engine_jax.tokenizer import TokenizerError


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_default_dtype_is_float32_on_cpu():
    assert jax.default_backend() == "cpu" and default_dtype() == jnp.float32


def test_gguf_converted_and_hf_sources_give_identical_params(tiny_gguf, tiny_hf_dir, tmp_path):
    path, _ = tiny_gguf
    from_gguf = load_model(str(path))
    from_converted = load_model(str(convert(path, tmp_path / "conv", progress=False)))
    from_hf = load_model(str(tiny_hf_dir))
    assert isinstance(from_gguf, LoadedModel)
    assert from_gguf.config == from_converted.config
    assert (from_gguf.config.num_layers, from_gguf.config.num_kv_heads) == (2, 2)
    assert from_gguf.config.eos_token_ids == (from_gguf.tokenizer.eos_token_ids[0],)
    reference = _leaves(from_gguf.params)
    for other in (from_converted, from_hf):
        leaves = _leaves(other.params)
        assert len(leaves) == len(reference)
        for a, b in zip(leaves, reference):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    assert from_hf.tokenizer.encode(" the<|end|>") == from_gguf.tokenizer.encode(" the<|end|>")


def test_dtype_override(tiny_gguf):
    path, _ = tiny_gguf
    model = load_model(str(path), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_registry_name_loads_from_the_cache(pulled_home, monkeypatch, smollm, capsys):
    monkeypatch.setenv("PIE_HOME", str(pulled_home))
    model = load_model("smollm2-135m-instruct")
    print(f"\ncached load of smollm2-135m-instruct: {model.load_seconds:.2f}s")
    assert model.name == "smollm2-135m-instruct" and str(pulled_home) in model.source
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert model.params.lm_head is None
    np.testing.assert_array_equal(np.asarray(model.params.embed), smollm.state_dict["model.embed_tokens.weight"])
    assert "converting" not in capsys.readouterr().err  # already converted by the fixture


def test_unknown_name_or_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"neither a known model \(gemma3-270m, smollm2-135m-instruct\)"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        load_model(str(tmp_path))
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        load_model(str(junk))


def test_hf_directory_without_tokenizer(tiny_hf_dir):
    (tiny_hf_dir / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_model(str(tiny_hf_dir))
