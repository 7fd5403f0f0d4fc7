"""Read a llama.cpp GGUF file as a Hugging Face style model: config dict, state dict, tokenizer.

Quantized tensors (the legacy and the K-quants) are dequantized to float32 with the ``gguf``
package, one tensor at a time when it is read (``gguf_tensors``: a loader never holds the whole
model in float32); llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py``'s ``permute``, applied to
llama-architecture models so its rotary kernel can pair adjacent rows) is undone; Gemma's norm
weights, which llama.cpp stores as ``1 + weight``, get the 1 taken off again; tensor names are
mapped back to transformers' names ("model.layers.0.self_attn.q_proj.weight"). The result loads
like any HF checkpoint.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine_jax.tokenizer import Tokenizer, TokenizerError
from engine_jax.weights import LazyTensor

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


@dataclass
class GGUFModel:
    config: dict[str, Any]  # a Hugging Face config.json dict
    state_dict: dict[str, np.ndarray]  # Hugging Face tensor names -> float32 arrays
    tokenizer: Tokenizer


# general.architecture -> (HF model_type, HF class name)
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
# Only llama.cpp's llama converter permutes Q/K; Qwen models are written in HF order.
_PERMUTED_ARCHITECTURES = {"llama"}

_TYPE_NAMES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 blocks have four norms: llama.cpp's ffn_norm is the pre-feedforward one there.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES_BY_ARCH = {"gemma3": _GEMMA3_BLOCK_NAMES}
# Architectures whose norm weights llama.cpp stores as 1 + weight.
_NORM_PLUS_ONE = {"gemma3"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def _supported_types() -> dict[int, str]:
    from gguf import GGMLQuantizationType

    return {int(GGMLQuantizationType[n]): n for n in _TYPE_NAMES}


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``, after checking that it is a complete GGUF file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damage
        raise GGUFError(f"{path}: unreadable GGUF file, truncated or damaged ({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        # np.memmap silently returns short slices past the end of a truncated file
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: truncated GGUF file (tensor {t.name!r} extends past the end of the file)")
    return reader


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any, path: str | Path = "<gguf>") -> dict[str, Any]:
    """The Hugging Face config.json dict that the GGUF metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    model_type, class_name = _ARCHITECTURES[arch]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer lists are used by hybrid models only
        raise GGUFError(f"{path}: per-layer key/value head counts are not supported")
    head_dim = int(key("attention.key_length", hidden // heads))
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise GGUFError(f"{path}: the vocabulary size is not stated ({arch}.vocab_size or tokenizer.ggml.tokens)")
    theta = float(key("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [class_name],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "num_hidden_layers": int(key("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(key("context_length", 2048)),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": any(n.endswith("attn_q.bias") for n in names),
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(reader, arch, config, path)
    if arch == "gemma3":
        config.update(_gemma3_config(key, head_dim))
    config["rope_scaling"] = scaling
    # transformers >= 5 reads rope settings from one dict (Gemma 3: one per layer type);
    # older versions from the keys above
    config["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    if arch == "gemma3":
        config["rope_parameters"] = {
            "full_attention": config["rope_parameters"],
            "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
        }
    return config


def _gemma3_config(key: Any, head_dim: int) -> dict[str, Any]:
    """The Gemma 3 fields llama.cpp does not store, as llama.cpp runs the model: every sixth
    layer global, local layers at RoPE base 10000, scores scaled by 1/sqrt(head_dim), except
    for the 27B (62 layers), scaled by 1/sqrt(hidden / heads) (its query_pre_attn_scalar, 168).
    (transformers' GGUF loader takes 256 for every size: the same for all but the 27B.)"""
    layers, hidden, heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim
    sliding_window = key("attention.sliding_window", required=True)
    softcap = key("final_logit_softcapping")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "sliding_window": int(sliding_window),
        "sliding_window_pattern": 6,
        "rope_local_base_freq": float(key("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "final_logit_softcapping": float(softcap) if softcap else None,
        "attn_logit_softcapping": None,
    }


def _rope_scaling(reader: Any, arch: str, config: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        return _llama3_scaling(np.asarray(rope_freqs.data, dtype=np.float64), config, path)
    if kind in (None, "none"):
        return None
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    raise GGUFError(f"{path}: rope scaling {kind!r} is not supported")


def _llama3_scaling(factors: np.ndarray, config: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling from the per-frequency divisors llama.cpp stores.

    The file keeps only the divisors; every released Llama 3.x uses low/high frequency factors
    1 and 4 and an original context of 8192, so we take those, read the scale factor off the
    lowest frequencies, and accept the result only if it reproduces the stored divisors.
    """
    head_dim = config["head_dim"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    candidate = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if factors.shape != inv_freq.shape or not np.allclose(
        _llama3_divisors(inv_freq, candidate), factors, rtol=1e-5, atol=1e-6
    ):
        raise GGUFError(f"{path}: rope_freqs does not match Llama 3 rope scaling; this scaling is not supported")
    return candidate


def _llama3_divisors(inv_freq: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    """llama.cpp's rope_freqs for a Llama 3 rope_scaling (see convert_hf_to_gguf.py)."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(out)


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The transformers name of a GGUF tensor; None for tensors folded into the config."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    block_names = _BLOCK_NAMES_BY_ARCH.get(arch, _BLOCK_NAMES)
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    raise KeyError(gguf_name)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``.

    llama.cpp reorders each head's rows from HF's [first half, second half] rotary layout to
    interleaved pairs; reading them back as (pair index, 2) and swapping restores HF's order.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def _read_tensor(tensor: Any, shape: tuple[int, ...], permute_heads: int | None, minus_one: bool) -> np.ndarray:
    """One GGUF tensor as a new float32 array in Hugging Face layout."""
    array = _dequantize(tensor.data, tensor.tensor_type, shape)
    if permute_heads is not None:
        array = unpermute_qk(array, permute_heads)
    if minus_one:
        array -= 1.0
    return array


def gguf_tensors(reader: Any, config: dict[str, Any], path: str | Path = "<gguf>") -> dict[str, LazyTensor]:
    """Every weight by Hugging Face name, dequantised to float32 only when read (a ``LazyTensor``:
    a loader holds one at a time, never the whole model in float32). Names and quantization types
    are checked here: a GGUFError names the first unsupported one."""
    supported = _supported_types()
    arch = _field(reader, "general.architecture")
    permute = config["model_type"] in _PERMUTED_ARCHITECTURES
    tensors: dict[str, LazyTensor] = {}
    for t in reader.tensors:
        try:
            name = hf_tensor_name(t.name, arch)
        except KeyError:
            raise GGUFError(f"{path}: unsupported tensor {t.name!r} for {config['model_type']} models") from None
        if name is None:
            continue
        if int(t.tensor_type) not in supported:
            raise GGUFError(
                f"{path}: tensor {t.name!r} uses unsupported quantization {t.tensor_type.name} "
                f"(supported: {', '.join(_TYPE_NAMES)})"
            )
        heads = None
        if permute and ".self_attn.q_proj." in name:
            heads = config["num_attention_heads"]
        elif permute and ".self_attn.k_proj." in name:
            heads = config["num_key_value_heads"]
        # llama.cpp lists dims fastest-first; numpy order is the reverse
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        minus_one = arch in _NORM_PLUS_ONE and name.endswith("norm.weight")
        tensors[name] = LazyTensor(shape, np.float32, functools.partial(_read_tensor, t, shape, heads, minus_one))
    return tensors


def iter_gguf_tensors(reader: Any, config: dict[str, Any], path: str | Path = "<gguf>") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every weight, one at a time (bounded memory)."""
    for name, tensor in gguf_tensors(reader, config, path).items():
        yield name, tensor.read()


_CHUNK_ELEMENTS = 4 * 1024 * 1024  # dequantized per call: bounds the temporaries of large tensors


def _dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 array (detached from the file's memmap), dequantized a block of rows at a time."""
    from gguf.quants import dequantize

    out = np.empty(shape, np.float32)
    rows = data if data.ndim > 1 else data[None]
    flat = out.reshape(rows.shape[0], -1)
    step = max(1, _CHUNK_ELEMENTS // max(flat.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        flat[start:start + step] = dequantize(rows[start:start + step], qtype).reshape(flat[start:start + step].shape)
    return out


def read_gguf_header(path: str | Path) -> tuple[Any, dict[str, Any], Tokenizer]:
    """``(reader, HF config dict, tokenizer)`` of a GGUF file, without dequantizing any tensor."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(reader)
    except TokenizerError as exc:
        raise GGUFError(f"{path}: {exc}") from exc
    # several eos ids (eot/eom) are written the way Llama 3's config.json lists them
    eos = tokenizer.eos_token_ids
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return reader, config, tokenizer


def load_gguf(path: str | Path, progress: bool = False) -> GGUFModel:
    """Load a GGUF file: HF config dict, float32 HF-named state dict and the tokenizer."""
    reader, config, tokenizer = read_gguf_header(path)
    tensors = iter_gguf_tensors(reader, config, path)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(reader.tensors), desc=f"dequantizing {Path(path).name}", unit="tensor")
    return GGUFModel(config=config, state_dict=dict(tensors), tokenizer=tokenizer)
