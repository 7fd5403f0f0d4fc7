"""The Llama-family decoder (Llama 3, Qwen2, Qwen3, Mistral) over a ragged batch of new tokens.

Weights are pytree dataclasses, one ``LayerParams`` per layer (separate
buffers per layer: slicing a layer-stacked array inside the step would copy
it on every call). Projections are stored ``[in, out...]`` with q/k/v and
gate/up fused so each layer runs two input matmuls. The fused outputs are
laid out so that any split along their head / intermediate axis is a
Megatron split (see ``engine_jax.sharding``): q/k/v grouped by KV head (its
query heads, then its K and V), gate and up side by side per intermediate unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax import quant
from engine_jax.config import ModelConfig
from engine_jax.kv_cache import KVCache
from engine_jax.paged_attention import AttentionFn


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerParams:
    attn_norm: jax.Array  # [hidden]
    w_qkv: jax.Array  # [hidden, num_kv_heads, group + 2, head_dim]: per KV head its group of q heads, K, V
    b_qkv: jax.Array | None  # [num_kv_heads, group + 2, head_dim]
    q_norm: jax.Array | None  # [head_dim]
    k_norm: jax.Array | None  # [head_dim]
    w_o: jax.Array  # [num_heads * head_dim, hidden]
    mlp_norm: jax.Array  # [hidden]
    w_gate_up: jax.Array  # [hidden, 2, intermediate]: gate, up
    w_down: jax.Array  # [intermediate, hidden]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Params:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab]; None = tied to embed


class WeightError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape; the message names it."""


@dataclass(frozen=True)
class HFNames:
    """Where a model's tensors are in a Hugging Face state dict (each family's ``hf_names``)."""

    prefix: str  # before ``embed_tokens.weight``, ``norm.weight`` and ``layers.{i}.``
    layer: tuple[str, ...]  # each layer's tensors, after ``layers.{i}.``
    lm_head: str | None  # None: tied to the embedding

    @property
    def embed(self) -> str:
        return self.prefix + "embed_tokens.weight"

    @property
    def final_norm(self) -> str:
        return self.prefix + "norm.weight"

    def layer_names(self, i: int) -> dict[str, str]:
        """Short name (as ``layer_from_hf`` reads it) -> full name, for layer ``i``."""
        return {short: f"{self.prefix}layers.{i}.{short}" for short in self.layer}


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the model reads, with its expected shape."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = {
        "input_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q_out, c.hidden_size),
        "self_attn.k_proj.weight": (kv_out, c.hidden_size),
        "self_attn.v_proj.weight": (kv_out, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, q_out),
        "post_attention_layernorm.weight": (c.hidden_size,),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    if c.attention_bias:
        layer.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                      "self_attn.v_proj.bias": (kv_out,)})
    if c.qk_norm:
        layer.update({"self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,)})
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def layer_tensor_names(config: ModelConfig) -> list[str]:
    """The per-layer part of the tensor names (after ``model.layers.{i}.``)."""
    prefix = "model.layers.0."
    return [name[len(prefix):] for name in hf_tensor_shapes(config) if name.startswith(prefix)]


def check_tensors(state_dict: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raises WeightError naming the first tensor that is missing or has the wrong shape."""
    for name, shape in shapes.items():
        if name not in state_dict:
            raise WeightError(f"checkpoint is missing tensor {name!r} (expected shape {shape})")
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise WeightError(f"tensor {name!r} has shape {got}, expected {shape}")


def hf_names(config: ModelConfig, state_dict: Mapping[str, object]) -> HFNames:
    """The tensors the model reads from ``state_dict`` (checked: WeightError names a missing or
    misshapen one)."""
    check_tensors(state_dict, hf_tensor_shapes(config))
    return HFNames("model.", tuple(layer_tensor_names(config)), None if config.tie_word_embeddings else "lm_head.weight")


def cast(array: Any, dtype: Any) -> Any:
    """``array`` in ``dtype`` (numpy or jax; no copy when it already is)."""
    return array if array.dtype == dtype else array.astype(dtype)


def fuse_qkv(q: Any, k: Any, v: Any, num_kv_heads: int, kv_heads: int, head_dim: int) -> Any:
    """Hugging Face q/k/v projections (``[heads * head_dim, ...]`` each) as one array
    ``[kv_heads, group + 2, head_dim, ...]``: per KV head its group of query heads, then its K
    and V. ``kv_heads`` may be a multiple of the model's ``num_kv_heads``: each is then
    repeated (tensor parallelism over more devices than KV heads)."""
    xp = jnp if isinstance(q, jax.Array) else np
    rest = q.shape[1:]
    group, repeat = q.shape[0] // head_dim // kv_heads, kv_heads // num_kv_heads
    q = q.reshape((kv_heads, group, head_dim) + rest)
    k, v = (xp.repeat(a.reshape((num_kv_heads, 1, head_dim) + rest), repeat, axis=0) for a in (k, v))
    return xp.concatenate([q, k, v], axis=1)


def stack_gate_up(gate: Any, up: Any) -> Any:
    """Hugging Face gate and up projections (``[intermediate, hidden]``) as ``[hidden, 2, intermediate]``."""
    xp = jnp if isinstance(gate, jax.Array) else np
    return xp.stack([gate.T, up.T], axis=1)


def layer_from_hf(config: ModelConfig, hf: Mapping[str, jax.Array | np.ndarray], kv_heads: int,
                  dtype: Any) -> LayerParams:
    """One layer in the engine's layout and ``dtype`` from its Hugging Face tensors (short
    names, as ``layer_tensor_names``); numpy in, numpy out, or jax arrays (also inside jit)."""
    c = config

    def proj(name: str):
        return hf[f"self_attn.{name}_proj.weight"]

    def qkv(q, k, v):
        return fuse_qkv(q, k, v, c.num_kv_heads, kv_heads, c.head_dim)

    bias = None
    if c.attention_bias:
        bias = qkv(*(hf[f"self_attn.{n}_proj.bias"] for n in "qkv"))
    layer = LayerParams(
        attn_norm=hf["input_layernorm.weight"],
        w_qkv=qkv(proj("q"), proj("k"), proj("v")).transpose(3, 0, 1, 2),
        b_qkv=bias,
        q_norm=hf["self_attn.q_norm.weight"] if c.qk_norm else None,
        k_norm=hf["self_attn.k_norm.weight"] if c.qk_norm else None,
        w_o=proj("o").T,
        mlp_norm=hf["post_attention_layernorm.weight"],
        w_gate_up=stack_gate_up(hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]),
        w_down=hf["mlp.down_proj.weight"].T,
    )
    return jax.tree.map(lambda a: cast(a, dtype), layer)


def params_from_hf(config: ModelConfig, embed: Any, final_norm: Any, lm_head: Any | None,
                   layers: tuple[LayerParams, ...], dtype: Any) -> Params:
    """The whole tree from the top-level Hugging Face tensors and the built layers."""
    return Params(embed=cast(embed, dtype), layers=layers, final_norm=cast(final_norm, dtype),
                  lm_head=None if lm_head is None else cast(lm_head.T, dtype))


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32), with Llama-3 or linear scaling applied."""
    return rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict)


def rope_frequencies(d: int, theta: float, scaling: Mapping) -> np.ndarray:
    """Inverse frequencies of a ``d``-dim RoPE with base ``theta`` and HF rope parameters ``scaling``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF "rotate half" RoPE; x ``[T, heads, head_dim]``, cos/sin ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TokenBatch:
    """Device arrays describing the new tokens of one step (shapes are bucketed by the engine).

    Padding tokens write to page ``num_pages`` (out of range, so the scatter drops them).
    """

    tokens: jax.Array  # int32[T]
    positions: jax.Array  # int32[T]
    write_pages: jax.Array  # int32[T] physical page of each token's slot
    write_offsets: jax.Array  # int32[T] offset within that page
    page_table: jax.Array  # int32[R, P]
    kv_lens: jax.Array  # int32[R]
    cu_q_lens: jax.Array  # int32[R+1]
    q_slots: jax.Array  # int32[T]
    custom_mask: jax.Array | None  # bool[T, P * page_size]
    output_rows: jax.Array  # int32[O] tokens whose next-token logits are wanted


def forward(
    params: Params,
    cache: KVCache,
    batch: TokenBatch,
    inv_freq: jax.Array,
    *,
    config: ModelConfig,
    attention: AttentionFn,
) -> tuple[KVCache, jax.Array]:
    """Runs the decoder over ``batch``: writes the new K/V into ``cache`` and returns float32 logits ``[O, vocab]``."""
    c = config
    num_tokens = batch.tokens.shape[0]
    q_size = c.num_heads * c.head_dim
    scale = c.head_dim ** -0.5

    freqs = batch.positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    # The new slots become attendable in this very step, before any layer reads them.
    slot_valid = cache.slot_valid.at[batch.write_pages, batch.write_offsets].set(True, mode="drop")

    x = quant.take_rows(params.embed, batch.tokens)
    new_k, new_v = [], []
    for layer, lp in enumerate(params.layers):
        h = _rms_norm(x, lp.attn_norm, c.rms_norm_eps)
        qkv = quant.einsum("th,hkgd->tkgd", h, lp.w_qkv)  # [T, kv_heads, group + 2, head_dim]
        if lp.b_qkv is not None:
            qkv = qkv + lp.b_qkv
        group = qkv.shape[2] - 2
        q = qkv[:, :, :group].reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        if lp.q_norm is not None:
            q = _rms_norm(q, lp.q_norm, c.rms_norm_eps)
            k = _rms_norm(k, lp.k_norm, c.rms_norm_eps)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        # Scatter first, then attend over the updated pages: XLA keeps the donated buffer in place.
        k_pages = cache.k[layer].at[batch.write_pages, batch.write_offsets].set(k.astype(cache.k[layer].dtype), mode="drop")
        v_pages = cache.v[layer].at[batch.write_pages, batch.write_offsets].set(v.astype(cache.v[layer].dtype), mode="drop")
        new_k.append(k_pages)
        new_v.append(v_pages)
        attn = attention(
            q, k_pages, v_pages, slot_valid, batch.page_table, batch.kv_lens,
            batch.cu_q_lens, batch.q_slots, batch.custom_mask, scale=scale,
        )
        x = x + quant.matmul(attn.reshape(num_tokens, q_size).astype(x.dtype), lp.w_o)
        h = _rms_norm(x, lp.mlp_norm, c.rms_norm_eps)
        gate_up = quant.einsum("th,hci->tci", h, lp.w_gate_up)
        x = x + quant.matmul(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], lp.w_down)

    new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), slot_valid=slot_valid)
    # The LM head runs only on the rows somebody asked about.
    h = _rms_norm(x[batch.output_rows], params.final_norm, c.rms_norm_eps)
    if params.lm_head is None:
        logits = quant.matmul_transposed(h, params.embed)
    else:
        logits = quant.matmul(h, params.lm_head)
    return new_cache, logits.astype(jnp.float32)
