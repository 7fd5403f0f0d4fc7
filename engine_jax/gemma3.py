"""The Gemma 3 text decoder (``Gemma3ForCausalLM``, the text part of ``Gemma3ForConditionalGeneration``).

What differs from the Llama family (``engine_jax.model``), following transformers' implementation:

* RMSNorm scales by ``1 + weight`` (stored here already added, in float32), and every block has
  four norms: before and after attention, before and after the MLP; q and k are RMS-normed per head.
* Embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the weight dtype, as transformers does).
* The MLP is GeGLU with tanh-approximated GELU.
* Attention scores are scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``.
* Each layer is local ("sliding_attention": attends only to tokens less than ``sliding_window``
  positions back, RoPE base ``rope_local_base_freq``) or global ("full_attention": RoPE base
  ``rope_theta`` with the config's rope scaling). The window is applied inside the attention op by
  position, so the KV pool records each slot's position (``KVCache.positions``).
* ``final_logit_softcapping`` (Gemma3ForCausalLM only) caps logits with ``c * tanh(logits / c)``.
  ``attn_logit_softcapping`` is read but, as in transformers' Gemma 3, not applied.

The parameter tree mirrors the Llama one (per-layer dataclasses, ``[in, out]`` projections, q/k/v
fused and grouped by KV head, gate/up side by side, as ``engine_jax.model``), so the tensor-parallel
rules of ``engine_jax.sharding``, written over field names, carry over (the four norms are replicated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax import quant
from engine_jax.config import _rope_of
from engine_jax.kv_cache import KVCache
from engine_jax.model import (
    HFNames,
    TokenBatch,
    WeightError,
    _apply_rope,
    cast,
    check_tensors,
    fuse_qkv,
    rope_frequencies,
    stack_gate_up,
)
from engine_jax.paged_attention import AttentionFn

LOCAL, GLOBAL = "sliding_attention", "full_attention"
_MODEL_TYPES = ("gemma3", "gemma3_text")
_CLASSES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def is_gemma3(hf_config: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face config.json dict describes a Gemma 3 model."""
    return hf_config.get("model_type") in _MODEL_TYPES or any(
        c in _CLASSES for c in hf_config.get("architectures") or ())


@dataclass(frozen=True)
class Gemma3Config:
    """Shapes and constants of a Gemma 3 text decoder. Frozen and hashable: a jit static argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # LOCAL or GLOBAL per layer
    sliding_window: int  # local layers see positions p - sliding_window < p' <= p
    rope_local_theta: float = 10000.0
    rope_theta: float = 1000000.0  # global layers
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # global layers only
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "gemma3"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Gemma3Config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {LOCAL, GLOBAL}:
            raise ValueError(f"layer_types must name {LOCAL!r} or {GLOBAL!r} for each of the {self.num_layers} "
                             f"layers, got {self.layer_types!r}")
        rope_type = dict(self.rope_scaling or ()).get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, config_dict: Mapping[str, Any]) -> "Gemma3Config":
        """From a ``gemma3_text`` config.json, or the ``text_config`` of a ``gemma3`` (multimodal) one."""
        causal_lm = config_dict.get("model_type") != "gemma3" and "text_config" not in config_dict
        text = config_dict if causal_lm else dict(config_dict.get("text_config") or {})
        get = text.get
        act = get("hidden_activation") or get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {act!r} for Gemma 3 (only gelu_pytorch_tanh)")
        if get("use_bidirectional_attention"):
            raise ValueError("Gemma 3 with use_bidirectional_attention=true (an encoder) is not supported")
        if get("attention_bias"):
            raise ValueError("Gemma 3 with attention_bias=true is not supported")
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            num_layers = int(text["num_hidden_layers"])
            local_theta, global_theta, scaling = _gemma_rope(text)
            eos = get("eos_token_id", config_dict.get("eos_token_id"))
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (
                (int(eos),) if eos is not None else ())
            bos = get("bos_token_id", config_dict.get("bos_token_id"))
            softcap = get("final_logit_softcapping") if causal_lm else None  # the multimodal head has none
            return cls(
                vocab_size=int(text["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(text["intermediate_size"]),
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                layer_types=_layer_types(text, num_layers),
                sliding_window=int(text["sliding_window"]),
                rope_local_theta=local_theta,
                rope_theta=global_theta,
                rope_scaling=scaling,
                query_pre_attn_scalar=float(get("query_pre_attn_scalar", 256)),
                final_logit_softcapping=float(softcap) if softcap else None,
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(get("max_position_embeddings", 131072)),
                tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", get("tie_word_embeddings", True))),
                bos_token_id=int(bos) if bos is not None else None,
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ValueError(f"config.json for gemma3 is missing the field {exc.args[0]!r}") from exc


def _layer_types(text: Mapping[str, Any], num_layers: int) -> tuple[str, ...]:
    types = text.get("layer_types")
    if types:
        return tuple(types)
    # transformers < 4.53: every sliding_window_pattern-th layer is global
    pattern = int(text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6)
    return tuple(LOCAL if (i + 1) % pattern else GLOBAL for i in range(num_layers))


def _gemma_rope(text: Mapping[str, Any]) -> tuple[float, float, tuple[tuple[str, Any], ...] | None]:
    """(local theta, global theta, global scaling) from transformers 5's per-layer-type rope_parameters
    or transformers 4's rope_theta / rope_local_base_freq / rope_scaling."""
    params = text.get("rope_parameters") or {}
    if GLOBAL in params or LOCAL in params:
        local = dict(params.get(LOCAL) or {})
        local_theta = float(local.get("rope_theta", text.get("rope_local_base_freq", 10000.0)))
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"local-layer rope_type {local['rope_type']!r} is not supported (only default)")
        global_theta, scaling = _rope_of({"rope_parameters": params.get(GLOBAL) or {},
                                          "rope_theta": text.get("rope_theta", 1000000.0)})
        return local_theta, global_theta, scaling
    global_theta, scaling = _rope_of({"rope_theta": 1000000.0, **text})
    return float(text.get("rope_local_base_freq", 10000.0)), global_theta, scaling


# --------------------------------------------------------------------------------------------- params


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Gemma3LayerParams:
    attn_norm: jax.Array  # f32[hidden], 1 + weight (as every norm here)
    w_qkv: jax.Array  # [hidden, num_kv_heads, group + 2, head_dim], as engine_jax.model's
    q_norm: jax.Array  # f32[head_dim]
    k_norm: jax.Array  # f32[head_dim]
    w_o: jax.Array  # [num_heads * head_dim, hidden]
    post_attn_norm: jax.Array  # f32[hidden]
    mlp_norm: jax.Array  # f32[hidden]
    w_gate_up: jax.Array  # [hidden, 2, intermediate]: gate, up
    w_down: jax.Array  # [intermediate, hidden]
    post_mlp_norm: jax.Array  # f32[hidden]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Gemma3Params:
    embed: jax.Array  # [vocab, hidden], unscaled
    layers: tuple[Gemma3LayerParams, ...]
    final_norm: jax.Array  # f32[hidden]
    lm_head: jax.Array | None  # [hidden, vocab]; None = tied to embed


_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def hf_names(config: Gemma3Config, state_dict: Mapping[str, Any]) -> HFNames:
    """The tensors of transformers' ``model.layers.{i}...`` (Gemma3ForCausalLM) or of the language
    model of a Gemma3ForConditionalGeneration (``model.language_model.`` / ``language_model.model.``),
    checked (WeightError names a missing or misshapen one)."""
    c = config
    prefix = next((p for p in _PREFIXES if p + "embed_tokens.weight" in state_dict), None)
    if prefix is None:
        raise WeightError("checkpoint is missing tensor 'model.embed_tokens.weight' (no Gemma 3 text model found)")
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = {
        "input_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q_out, c.hidden_size),
        "self_attn.k_proj.weight": (kv_out, c.hidden_size),
        "self_attn.v_proj.weight": (kv_out, c.hidden_size),
        "self_attn.q_norm.weight": (c.head_dim,),
        "self_attn.k_norm.weight": (c.head_dim,),
        "self_attn.o_proj.weight": (c.hidden_size, q_out),
        "post_attention_layernorm.weight": (c.hidden_size,),
        "pre_feedforward_layernorm.weight": (c.hidden_size,),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        "post_feedforward_layernorm.weight": (c.hidden_size,),
    }
    lm_head = None
    if not c.tie_word_embeddings:
        lm_head = "language_model.lm_head.weight" if prefix == "language_model.model." else "lm_head.weight"
    names = HFNames(prefix, tuple(layer), lm_head)
    shapes = {names.embed: (c.vocab_size, c.hidden_size), names.final_norm: (c.hidden_size,)}
    if lm_head is not None:
        shapes[lm_head] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        shapes.update({names.layer_names(i)[short]: shape for short, shape in layer.items()})
    check_tensors(state_dict, shapes)
    return names


def _norm(weight: Any) -> Any:
    """Gemma's norm scale: 1 + weight, in float32 (numpy or jax)."""
    return 1.0 + weight.astype(np.float32)


def layer_from_hf(config: Gemma3Config, hf: Mapping[str, Any], kv_heads: int, dtype: Any) -> Gemma3LayerParams:
    """One layer in the engine's layout from its Hugging Face tensors (short names, as ``hf_names``):
    projections in ``dtype``, grouped as ``engine_jax.model``'s; norms float32. numpy in, numpy out,
    or jax arrays (also inside jit)."""
    c = config

    def proj(name: str) -> Any:
        return hf[f"self_attn.{name}_proj.weight"]

    w_qkv = fuse_qkv(proj("q"), proj("k"), proj("v"), c.num_kv_heads, kv_heads, c.head_dim).transpose(3, 0, 1, 2)
    return Gemma3LayerParams(
        attn_norm=_norm(hf["input_layernorm.weight"]),
        w_qkv=cast(w_qkv, dtype),
        q_norm=_norm(hf["self_attn.q_norm.weight"]),
        k_norm=_norm(hf["self_attn.k_norm.weight"]),
        w_o=cast(proj("o").T, dtype),
        post_attn_norm=_norm(hf["post_attention_layernorm.weight"]),
        mlp_norm=_norm(hf["pre_feedforward_layernorm.weight"]),
        w_gate_up=cast(stack_gate_up(hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]), dtype),
        w_down=cast(hf["mlp.down_proj.weight"].T, dtype),
        post_mlp_norm=_norm(hf["post_feedforward_layernorm.weight"]),
    )


def params_from_hf(config: Gemma3Config, embed: Any, final_norm: Any, lm_head: Any | None,
                   layers: tuple[Gemma3LayerParams, ...], dtype: Any) -> Gemma3Params:
    """The whole tree from the top-level Hugging Face tensors and the built layers."""
    return Gemma3Params(embed=cast(embed, dtype), layers=layers, final_norm=_norm(final_norm),
                        lm_head=None if lm_head is None else cast(lm_head.T, dtype))


def rope_inv_freq(config: Gemma3Config) -> np.ndarray:
    """float32 ``[2, head_dim // 2]``: row 0 for local layers, row 1 for global layers."""
    local = rope_frequencies(config.head_dim, config.rope_local_theta, {})
    global_ = rope_frequencies(config.head_dim, config.rope_theta, dict(config.rope_scaling or ()))
    return np.stack([local, global_])


# -------------------------------------------------------------------------------------------- forward


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: normalise and scale in float32, then cast back (``scale`` is 1 + weight)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype)


def forward(
    params: Gemma3Params,
    cache: KVCache,
    batch: TokenBatch,
    inv_freq: jax.Array,
    *,
    config: Gemma3Config,
    attention: AttentionFn,
) -> tuple[KVCache, jax.Array]:
    """Runs the decoder over ``batch``: writes K/V and positions into ``cache``; float32 logits ``[O, vocab]``."""
    c = config
    num_tokens = batch.tokens.shape[0]
    q_size = c.num_heads * c.head_dim
    scale = c.query_pre_attn_scalar ** -0.5

    freqs = batch.positions.astype(jnp.float32)[None, :, None] * inv_freq[:, None, :]  # [2, T, d/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    rope = {LOCAL: (jnp.cos(angles[0]), jnp.sin(angles[0])), GLOBAL: (jnp.cos(angles[1]), jnp.sin(angles[1]))}

    slot_valid = cache.slot_valid.at[batch.write_pages, batch.write_offsets].set(True, mode="drop")
    kv_positions = cache.positions.at[batch.write_pages, batch.write_offsets].set(batch.positions, mode="drop")

    embed_scale = jnp.asarray(math.sqrt(c.hidden_size), dtype=params.embed.dtype)
    x = quant.take_rows(params.embed, batch.tokens) * embed_scale
    new_k, new_v = [], []
    for layer, lp in enumerate(params.layers):
        kind = c.layer_types[layer]
        h = _rms_norm(x, lp.attn_norm, c.rms_norm_eps)
        qkv = quant.einsum("th,hkgd->tkgd", h, lp.w_qkv)  # [T, kv_heads, group + 2, head_dim]
        group = qkv.shape[2] - 2
        q = qkv[:, :, :group].reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        cos, sin = rope[kind]
        q = _apply_rope(_rms_norm(q, lp.q_norm, c.rms_norm_eps), cos, sin)
        k = _apply_rope(_rms_norm(k, lp.k_norm, c.rms_norm_eps), cos, sin)
        k_pages = cache.k[layer].at[batch.write_pages, batch.write_offsets].set(k.astype(cache.k[layer].dtype), mode="drop")
        v_pages = cache.v[layer].at[batch.write_pages, batch.write_offsets].set(v.astype(cache.v[layer].dtype), mode="drop")
        new_k.append(k_pages)
        new_v.append(v_pages)
        window = {}
        if kind == LOCAL:
            window = dict(window=c.sliding_window, q_positions=batch.positions, kv_positions=kv_positions)
        attn = attention(
            q, k_pages, v_pages, slot_valid, batch.page_table, batch.kv_lens,
            batch.cu_q_lens, batch.q_slots, batch.custom_mask, scale=scale, **window,
        )
        h = quant.matmul(attn.reshape(num_tokens, q_size).astype(x.dtype), lp.w_o)
        x = x + _rms_norm(h, lp.post_attn_norm, c.rms_norm_eps)
        h = _rms_norm(x, lp.mlp_norm, c.rms_norm_eps)
        gate_up = quant.einsum("th,hci->tci", h, lp.w_gate_up)
        h = quant.matmul(jax.nn.gelu(gate_up[:, 0], approximate=True) * gate_up[:, 1], lp.w_down)
        x = x + _rms_norm(h, lp.post_mlp_norm, c.rms_norm_eps)

    new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), slot_valid=slot_valid, positions=kv_positions)
    h = _rms_norm(x[batch.output_rows], params.final_norm, c.rms_norm_eps)
    logits = (quant.matmul_transposed(h, params.embed) if params.lm_head is None
              else quant.matmul(h, params.lm_head)).astype(jnp.float32)
    if c.final_logit_softcapping:
        cap = c.final_logit_softcapping
        logits = cap * jnp.tanh(logits / cap)
    return new_cache, logits
