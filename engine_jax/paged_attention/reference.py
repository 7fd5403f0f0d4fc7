"""Paged attention in plain jnp: the oracle for the kernel and the CPU default.

Every new token gathers the K/V pages of its own request and runs a masked
float32 softmax over them. Tokens are processed in chunks so the gathered
K/V (tokens x slots x heads x dim) stays within a fixed element budget even
for long prefills.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Upper bound on gathered K elements per chunk (K and V each): ~128 MiB in float32.
_GATHER_BUDGET = 32 * 1024 * 1024


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_valid: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    q_slots: jax.Array,
    custom_mask: jax.Array | None,
    *,
    scale: float,
) -> jax.Array:
    """Attention of ragged new tokens over paged KV; see the package docstring for semantics."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_requests, max_pages = page_table.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    max_slots = max_pages * page_size
    if custom_mask is not None and custom_mask.shape != (num_tokens, max_slots):
        raise ValueError(f"custom_mask shape {custom_mask.shape} != {(num_tokens, max_slots)}")
    if num_tokens == 0:
        return q

    # Request of each token; padding tokens past cu_q_lens[-1] are clamped onto the last request.
    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)
    token_req = jnp.searchsorted(cu_q_lens[1:], token_ids, side="right").astype(jnp.int32)
    token_req = jnp.minimum(token_req, num_requests - 1)

    per_token = max_slots * num_kv_heads * head_dim
    chunk = max(1, min(num_tokens, _GATHER_BUDGET // max(per_token, 1)))
    chunk = 1 << (chunk.bit_length() - 1)  # power of two keeps shapes regular

    def attend(q_c, req_c, slots_c, mask_c):
        return _attend_chunk(
            q_c, req_c, slots_c, mask_c, k_pages, v_pages, slot_valid, page_table, kv_lens, scale
        )

    if chunk >= num_tokens:
        return attend(q, token_req, q_slots, custom_mask)

    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    def chunked(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    xs = (chunked(q), chunked(token_req), chunked(q_slots))
    if custom_mask is not None:
        out = jax.lax.map(lambda a: attend(a[0], a[1], a[2], a[3]), xs + (chunked(custom_mask),))
    else:
        out = jax.lax.map(lambda a: attend(a[0], a[1], a[2], None), xs)
    return out.reshape((num_chunks * chunk,) + q.shape[1:])[:num_tokens]


def _attend_chunk(q, token_req, q_slots, custom_mask, k_pages, v_pages, slot_valid, page_table, kv_lens, scale):
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    max_slots = page_table.shape[1] * page_size
    group = num_q_heads // num_kv_heads

    pages = page_table[token_req]  # [t, max_pages]
    k = k_pages[pages].reshape(num_tokens, max_slots, num_kv_heads, head_dim)
    v = v_pages[pages].reshape(num_tokens, max_slots, num_kv_heads, head_dim)
    valid = slot_valid[pages].reshape(num_tokens, max_slots)

    slots = jnp.arange(max_slots, dtype=jnp.int32)
    allowed = valid & (slots[None, :] < kv_lens[token_req][:, None])
    if custom_mask is not None:
        allowed = allowed & custom_mask
    else:
        allowed = allowed & (slots[None, :] <= q_slots[:, None])

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,tskd->tkgs", qg, k.astype(jnp.float32)) * scale
    scores = jnp.where(allowed[:, None, None, :], scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(allowed[:, None, None, :], jnp.exp(scores - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    # A token with no attendable slot gets zeros instead of 0/0.
    weights = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("tkgs,tskd->tkgd", weights, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
