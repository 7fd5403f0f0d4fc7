"""GGUF loading: dequantization, Q/K un-permutation, names and config, against transformers' loader."""

from __future__ import annotations

import numpy as np
import pytest

from engine_jax.config import ModelConfig
from engine_jax.gguf import GGUFError, load_gguf, unpermute_qk


# ---------------------------------------------------------------------------- the real SmolLM2 file
@pytest.mark.slow
def test_state_dict_matches_transformers_gguf_loader(smollm, hf_gguf_model):
    theirs = {k: v.detach().numpy() for k, v in hf_gguf_model.state_dict().items()}
    ours = smollm.state_dict
    if smollm.config["tie_word_embeddings"]:
        # transformers lists the tied head under its own name too
        assert np.array_equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == np.float32, name
        assert ours[name].shape == expected.shape, name
        np.testing.assert_allclose(ours[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_config_matches_transformers(smollm, hf_gguf_model):
    theirs = hf_gguf_model.config
    ours = smollm.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps)
    assert ours["rope_theta"] == pytest.approx(theirs.rope_parameters["rope_theta"])
    config = ModelConfig.from_hf(ours)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_scaling is None


@pytest.mark.slow
def test_our_config_and_weights_reproduce_transformers_logits(smollm, hf_gguf_model):
    """Our config dict + state dict, loaded into transformers' own Llama, give the GGUF model's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(**smollm.config)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in smollm.state_dict.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf_gguf_model(ids).logits
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4)


def test_real_file_metadata(smollm):
    assert smollm.config["model_type"] == "llama"
    assert smollm.state_dict["model.embed_tokens.weight"].shape == (49152, 576)
    assert smollm.state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert "lm_head.weight" not in smollm.state_dict
    assert smollm.tokenizer.vocab_size == 49152


# ---------------------------------------------------------------------------- tiny synthetic files
def test_unpermute_inverts_llama_cpp_permute(tiny):
    rng = np.random.default_rng(1)
    # (n_head, n_head_kv, rows): a q projection, and k projections with grouped heads
    for heads, kv_heads, rows in ((4, 4, 64), (4, 2, 32), (9, 3, 192)):
        w = rng.standard_normal((rows, 24)).astype(np.float32)
        permuted = tiny.permute(w, heads, kv_heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_qk(permuted, kv_heads), w)


def test_unpermute_rejects_odd_rows():
    with pytest.raises(ValueError, match="heads"):
        unpermute_qk(np.zeros((10, 4), np.float32), 4)


def test_f32_round_trip_is_exact(tiny_gguf):
    path, sd = tiny_gguf
    model = load_gguf(path)
    assert sorted(model.state_dict) == sorted(sd)
    for name, expected in sd.items():
        np.testing.assert_array_equal(model.state_dict[name], expected, err_msg=name)
    cfg = model.config
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (64, 4, 2, 16)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 261
    ModelConfig.from_hf(cfg)


def test_untied_output_maps_to_lm_head(tiny, tmp_path):
    sd = tiny.state_dict(tied=False)
    tiny.write(tmp_path / "m.gguf", sd)
    model = load_gguf(tmp_path / "m.gguf")
    assert model.config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(model.state_dict["lm_head.weight"], sd["lm_head.weight"])


@pytest.mark.parametrize("qtype, tol", [("F16", 2e-4), ("BF16", 2e-3), ("Q8_0", 2e-3), ("Q4_0", 3e-2), ("Q4_1", 3e-2)])
def test_quantized_tensors_dequantize_close_to_originals(tiny, tmp_path, qtype, tol):
    sd = tiny.state_dict()
    tiny.write(tmp_path / "q.gguf", sd, qtype=qtype)
    model = load_gguf(tmp_path / "q.gguf")
    for name, expected in sd.items():
        got = model.state_dict[name]
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        # weights are ~N(0, 0.1): an error bound relative to that scale; a wrong row order fails by far
        assert np.abs(got - expected).max() < tol * 10, (name, np.abs(got - expected).max())


def test_q6_k_block_dequantizes_by_llama_cpp_layout(tmp_path):
    """One hand-built Q6_K super-block: every 6-bit quant is 40 (=8 after the -32 offset)."""
    import gguf

    scales = np.arange(1, 17, dtype=np.int8)  # one scale per 16 values
    d = np.float16(0.25)
    block = (
        bytes([0x88] * 128)  # ql: low nibbles 8 and high nibbles 8
        + bytes([0xAA] * 64)  # qh: every 2-bit field = 2, so q = 8 | 2 << 4 = 40
        + scales.tobytes()
        + d.tobytes()
    )
    raw = np.frombuffer(block * 64, dtype=np.uint8).reshape(64, 210)  # 64 rows of 256
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("probe", raw, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    reader = gguf.GGUFReader(str(tmp_path / "k.gguf"))
    expected = np.repeat(0.25 * scales.astype(np.float32) * 8, 16)
    from engine_jax.gguf import _supported_types

    assert int(gguf.GGMLQuantizationType.Q6_K) in _supported_types()
    got = gguf.quants.dequantize(reader.tensors[0].data, reader.tensors[0].tensor_type)
    np.testing.assert_array_equal(got.reshape(64, 256)[0], expected)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=131072, rope_parameters={**scaling, "rope_theta": 10000.0},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    rope_freqs = (plain / scaled.numpy().astype(np.float64)).astype(np.float32)
    tiny.write(tmp_path / "l3.gguf", tiny.state_dict(), extra_tensors={"rope_freqs.weight": rope_freqs})
    model = load_gguf(tmp_path / "l3.gguf")
    assert model.config["rope_scaling"] == pytest.approx(scaling)
    assert "rope_freqs.weight" not in model.state_dict
    assert ModelConfig.from_hf(model.config).rope_scaling_dict["rope_type"] == "llama3"


# ---------------------------------------------------------------------------- bad files
def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(GGUFError, match=r"junk\.gguf.*not a GGUF file"):
        load_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_truncated_file_is_reported(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*(truncated|unreadable)"):
        load_gguf(cut)


def test_unsupported_architecture(tiny, tmp_path):
    tiny.write(tmp_path / "g.gguf", tiny.state_dict(), arch="gpt2")
    with pytest.raises(GGUFError, match=r"g\.gguf.*unsupported architecture 'gpt2'"):
        load_gguf(tmp_path / "g.gguf")


def test_unsupported_quantization(tiny, tmp_path):
    import gguf

    # an IQ4_NL tensor (a type we do not dequantize): 18-byte blocks of 32 values
    raw = np.zeros((4, 18 * 2), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    w.add_block_count(1); w.add_embedding_length(64); w.add_feed_forward_length(96); w.add_head_count(4)
    w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.add_uint32("llama.vocab_size", 4)
    w.add_tokenizer_model("gpt2"); w.add_token_list(tiny.tokens()); w.add_token_merges(["h e"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match=r"iq2\.gguf.*unsupported quantization IQ4_NL"):
        load_gguf(tmp_path / "iq2.gguf")


def test_unknown_tensor_is_reported(tiny, tmp_path):
    tiny.write(tmp_path / "x.gguf", tiny.state_dict(), extra_tensors={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(GGUFError, match="unsupported tensor 'blk.0.ffn_gate_exps.weight'"):
        load_gguf(tmp_path / "x.gguf")
