"""config.json -> ModelConfig, safetensors reading, and state dict -> Params, with their errors."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from engine_jax.config import ModelConfig
from engine_jax.families import params_from_state_dict
from engine_jax.model import WeightError, rope_inv_freq
from engine_jax.weights import CheckpointError, load_hf_checkpoint, read_safetensors
from tests.helpers.hf_models import FAMILIES, build_model_dir


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_reads_each_family(family, small_model_dir):
    raw = json.loads((small_model_dir(family) / "config.json").read_text())
    c = ModelConfig.from_hf(raw)
    assert c.architecture == family
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (384, 64, 128)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.max_position_embeddings) == (2, 4, 2, 512)
    assert c.head_dim == (24 if family == "qwen3" else 16)
    assert c.attention_bias == (family == "qwen2")
    assert c.qk_norm == (family == "qwen3")
    assert c.tie_word_embeddings == (family == "llama")
    assert c.eos_token_ids == (381,)
    if family == "llama":
        assert c.rope_theta == 500000.0
        assert c.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        hash(c)  # a jit static argument
    else:
        assert c.rope_scaling is None


def test_from_hf_reads_transformers4_style_rope_fields():
    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1234.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [3, 4]}
    c = ModelConfig.from_hf(raw)
    assert (c.rope_theta, c.rope_scaling_dict) == (1234.0, {"rope_type": "linear", "factor": 2.0})
    assert (c.num_kv_heads, c.head_dim, c.eos_token_ids) == (2, 4, (3, 4))
    plain = ModelConfig.from_hf({**raw, "rope_scaling": None})
    np.testing.assert_allclose(rope_inv_freq(c), rope_inv_freq(plain) / 2)


def test_llama3_rope_frequencies_match_transformers(small_model_dir):
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    directory = small_model_dir("llama")
    hf_config = AutoConfig.from_pretrained(str(directory))
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    got = rope_inv_freq(ModelConfig.from_hf(json.loads((directory / "config.json").read_text())))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model architecture 'gpt2'"),
    ({"architectures": ["FalconForCausalLM"]}, "'FalconForCausalLM'; supported model types: llama, qwen2, qwen3, mistral"),
    ({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}, "missing the field 'vocab_size'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "unsupported rope_type 'yarn'"),
    ({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}, "multiple of num_kv_heads"),
])
def test_from_hf_rejects_unsupported_configs(raw, message):
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf(raw)
    assert message in str(info.value)


def test_architecture_from_class_name_when_model_type_is_missing():
    raw = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    assert ModelConfig.from_hf(raw).architecture == "qwen2"


def test_sharded_checkpoint_loads_like_a_single_file(small_model_dir, tmp_path):
    single_config, single = load_hf_checkpoint(small_model_dir("qwen3"))
    sharded_dir = build_model_dir("qwen3", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded_dir / "model.safetensors.index.json").exists()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    sharded_config, sharded = load_hf_checkpoint(sharded_dir)
    assert sharded_config == single_config
    assert sorted(sharded) == sorted(single)
    for name in single:  # same seed -> same weights
        np.testing.assert_array_equal(sharded[name], single[name])


def test_checkpoint_errors_name_the_file(small_model_dir, tmp_path):
    source = small_model_dir("mistral")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_hf_checkpoint(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_hf_checkpoint(broken)
    shutil.copy(source / "config.json", broken / "config.json")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* \(file truncated\?\)"):
        load_hf_checkpoint(broken)
    weights.write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt header length"):
        load_hf_checkpoint(broken)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors files found"):
        load_hf_checkpoint(broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors: shard listed in .* is missing"):
        load_hf_checkpoint(broken)


def test_bfloat16_tensors_are_read(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensor = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"w": tensor}, str(tmp_path / "x.safetensors"))
    got = read_safetensors(tmp_path / "x.safetensors")["w"]
    np.testing.assert_array_equal(got.astype(np.float32), tensor.float().numpy())


def test_params_from_state_dict_errors_name_the_tensor(small_model_dir):
    raw, state = load_hf_checkpoint(small_model_dir("qwen2"))
    config = ModelConfig.from_hf(raw)
    params = params_from_state_dict(config, state, jnp.float32)
    assert len(params.layers) == 2 and params.lm_head is not None and params.layers[0].b_qkv is not None
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(WeightError, match="missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        params_from_state_dict(config, missing, jnp.float32)
    wrong = dict(state)
    wrong["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 63), np.float32)
    with pytest.raises(WeightError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(128, 63\), expected \(128, 64\)"):
        params_from_state_dict(config, wrong, jnp.float32)
    untied = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(WeightError, match="missing tensor 'lm_head.weight'"):
        params_from_state_dict(config, untied, jnp.float32)
