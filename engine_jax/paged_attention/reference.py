"""Paged attention in plain jnp: the oracle for the kernel and the CPU default.

Two implementations of the same op (see the package docstring for the
semantics), chosen statically from the (bucketed) shapes by
``paged_attention_reference``:

* **per token** (``paged_attention_per_token``): every new token gathers the
  K/V pages of its own request (``[tokens, slots, kv_heads, head_dim]``) and
  runs a masked float32 softmax over them, in chunks of tokens so the gathered
  K/V stays within a fixed element budget. For a decode batch (one token per
  request) that is one copy of each request's K/V in one batched op: the
  cheapest way. For a prefill of T tokens of one request it copies the same
  K/V T times (memory traffic grows as T x slots), and its products are
  matrix-vector products that leave the CPU's FMA units mostly idle.

* **by request** (``paged_attention_by_request``): the new tokens are cut into
  *jobs* of ``chunk`` consecutive tokens of one request (a request of n new
  tokens makes ceil(n / chunk) jobs). A loop with a dynamic trip count (the
  number of real jobs: padding requests and padding tokens cost nothing) runs
  each job against its own request's K/V only, block by block
  (``_BLOCK_SLOTS`` slots, whole pages, gathered straight from the pool), with
  an online (flash-attention style) float32 softmax, and writes the job's rows
  of the output. The products are matrix-matrix products, kv-head first
  (``[kv_heads, chunk * group, block]`` scores). Every block of a request is
  gathered once per job, not once per token, and a job stops at its last
  attendable slot: under the causal rule the blocks past its last token's
  slot are skipped, which about halves the work of a prefill. Masking every token
  against the K/V of all R requests at once (scores ``[tokens, heads,
  R * slots]``) would multiply the work by R instead; a job touches only its
  own request, at the price of at most one partly filled job per request.

The rule (``use_by_request``): the by-request path when ``tokens >= 2 *
requests`` (bucketed sizes), i.e. when requests bring at least two new tokens
each on average: every prefill and prompt chunk. The per-token path
otherwise, which is the pure decode batch (tokens == requests). There the
by-request path would run one job per request (chunk 1) in a sequential loop,
a little slower than the per-token path's single batched gather; from two
tokens per request on, jobs have ``chunk >= 2`` rows and the by-request path
is at least as fast (measured at SmolLM2-135M's shapes on a 2-core CPU:
16 requests x 2 tokens about even, 1 x 512 tokens ~25x faster; see
``benchmarks/prefill.py`` and ``benchmarks/RESULTS.md``).

``chunk`` is the largest power of two <= tokens / requests (uniform batches
fill their jobs exactly), capped at ``_MAX_CHUNK`` and so that one job's
scores for one block (``chunk x heads x block``, float32) stay within
``_SCORE_BUDGET`` elements (in cache). Both paths give the same results up to
float32 rounding (summation order); the by-request path outputs zeros on
padding rows past ``cu_q_lens[-1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Upper bound on gathered K elements per chunk of the per-token path (K and V each): ~128 MiB in float32.
_GATHER_BUDGET = 32 * 1024 * 1024
# Upper bound on the float32 scores of one job and K/V block of the by-request path (chunk x heads x block): 4 MiB.
_SCORE_BUDGET = 1024 * 1024
# K/V slots per block of the by-request path (rounded to whole pages).
_BLOCK_SLOTS = 256
# Upper bound on the tokens of one job of the by-request path.
_MAX_CHUNK = 256


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
    window: int | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """Attention of ragged new tokens over paged KV; see the package docstring for semantics."""
    fn = paged_attention_by_request if use_by_request(q.shape[0], page_table.shape[0]) else paged_attention_per_token
    return fn(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask, scale=scale,
              window=window, q_positions=q_positions, kv_positions=kv_positions)


def use_by_request(num_tokens: int, num_requests: int) -> bool:
    """The static rule of ``paged_attention_reference`` (see the module docstring)."""
    return num_tokens >= 2 * num_requests


def check_window(window, q_positions, kv_positions, num_tokens: int, num_pages: int, page_size: int) -> None:
    """ValueError unless a window (if any) comes with positions of the right shapes."""
    if window is None:
        return
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if q_positions is None or q_positions.shape != (num_tokens,):
        raise ValueError(f"a window needs q_positions of shape {(num_tokens,)}")
    if kv_positions is None or kv_positions.shape != (num_pages, page_size):
        raise ValueError(f"a window needs kv_positions of shape {(num_pages, page_size)}")


def _check_shapes(q, k_pages, page_table, custom_mask, window=None, q_positions=None, kv_positions=None) -> None:
    num_tokens, num_q_heads, _ = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    check_window(window, q_positions, kv_positions, num_tokens, num_pages, page_size)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    max_slots = page_table.shape[1] * page_size
    if custom_mask is not None and custom_mask.shape != (num_tokens, max_slots):
        raise ValueError(f"custom_mask shape {custom_mask.shape} != {(num_tokens, max_slots)}")


# ---------------------------------------------------------------------------------------------- per token


def paged_attention_per_token(
    q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask, *, scale: float,
    window: int | None = None, q_positions=None, kv_positions=None,
) -> jax.Array:
    """Every token gathers its request's whole K/V (the decode path; see the module docstring)."""
    _check_shapes(q, k_pages, page_table, custom_mask, window, q_positions, kv_positions)
    num_tokens, _, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_requests, max_pages = page_table.shape
    max_slots = max_pages * page_size
    if num_tokens == 0:
        return q

    # Request of each token; padding tokens past cu_q_lens[-1] are clamped onto the last request.
    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)
    token_req = jnp.searchsorted(cu_q_lens[1:], token_ids, side="right").astype(jnp.int32)
    token_req = jnp.minimum(token_req, num_requests - 1)

    per_token = max_slots * num_kv_heads * head_dim
    chunk = max(1, min(num_tokens, _GATHER_BUDGET // max(per_token, 1)))
    chunk = 1 << (chunk.bit_length() - 1)  # power of two keeps shapes regular

    if window is None:
        q_positions = jnp.zeros_like(q_slots)  # unused: keeps one chunking code path

    def attend(q_c, req_c, slots_c, pos_c, mask_c):
        allowed_window = None
        if window is not None:
            pages = page_table[req_c]
            kv_pos = kv_positions[pages].reshape(q_c.shape[0], max_slots)
            allowed_window = pos_c[:, None] - kv_pos < window
        return _attend_chunk(
            q_c, req_c, slots_c, mask_c, allowed_window, k_pages, v_pages, slot_valid, page_table, kv_lens, scale
        )

    if chunk >= num_tokens:
        return attend(q, token_req, q_slots, q_positions, custom_mask)

    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    def chunked(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    xs = (chunked(q), chunked(token_req), chunked(q_slots), chunked(q_positions))
    if custom_mask is not None:
        out = jax.lax.map(lambda a: attend(*a), xs + (chunked(custom_mask),))
    else:
        out = jax.lax.map(lambda a: attend(*a, None), xs)
    return out.reshape((num_chunks * chunk,) + q.shape[1:])[:num_tokens]


def _attend_chunk(q, token_req, q_slots, custom_mask, allowed_window, k_pages, v_pages, slot_valid, page_table,
                  kv_lens, scale):
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
    if allowed_window is not None:
        allowed = allowed & allowed_window

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


# -------------------------------------------------------------------------------------------- by request


def by_request_chunk(num_tokens: int, num_requests: int, num_q_heads: int, block_slots: int) -> int:
    """Tokens per job of the by-request path (a power of two; see the module docstring)."""
    chunk = max(1, min(num_tokens // max(num_requests, 1), _MAX_CHUNK,
                       _SCORE_BUDGET // max(num_q_heads * block_slots, 1)))
    return 1 << (chunk.bit_length() - 1)


def paged_attention_by_request(
    q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask, *,
    scale: float, chunk: int | None = None, block_pages: int | None = None,
    window: int | None = None, q_positions=None, kv_positions=None,
) -> jax.Array:
    """Jobs of ``chunk`` tokens of one request over that request's K/V blocks (see the module docstring).

    ``chunk`` (tokens per job) and ``block_pages`` (pages per K/V block) default
    to the module's rule; tests pass small values to exercise many jobs and
    blocks. Rows past ``cu_q_lens[-1]`` (padding) belong to no job and come out
    as zeros. With a ``window``, a job starts at the block of the first slot
    that is valid and inside the window of one of its tokens.
    """
    _check_shapes(q, k_pages, page_table, custom_mask, window, q_positions, kv_positions)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_requests, max_pages = page_table.shape
    group = num_q_heads // num_kv_heads
    if num_tokens == 0:
        return q
    if block_pages is None:
        block_pages = max(1, min(max_pages, _BLOCK_SLOTS // page_size))
    block = block_pages * page_size
    num_blocks = -(-max_pages // block_pages)
    padded_slots = num_blocks * block
    if num_blocks * block_pages != max_pages:
        # Extra page-table columns hold slots >= max_slots >= kv_len: never attended.
        page_table = jnp.pad(page_table, [(0, 0), (0, num_blocks * block_pages - max_pages)])
        if custom_mask is not None:
            custom_mask = jnp.pad(custom_mask, [(0, 0), (0, padded_slots - custom_mask.shape[1])])
    if chunk is None:
        chunk = by_request_chunk(num_tokens, num_requests, num_q_heads, block)

    cu = cu_q_lens.astype(jnp.int32)
    q_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    cu_jobs = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum((q_lens + chunk - 1) // chunk)])

    # Padded by one job so a job's window never runs off the end (dynamic_slice would shift it back).
    # Queries kv-head first, [kv_heads, tokens, group, d], so each job's products are plain batched matmuls.
    qk = jnp.pad(q, [(0, chunk), (0, 0), (0, 0)]).astype(jnp.float32) * scale
    qk = qk.reshape(num_tokens + chunk, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    slots_pad = jnp.pad(q_slots, [(0, chunk)])
    pos_pad = None if window is None else jnp.pad(q_positions, [(0, chunk)])
    mask_pad = None if custom_mask is None else jnp.pad(custom_mask, [(0, chunk), (0, 0)])
    rows = jnp.arange(chunk, dtype=jnp.int32)
    block_offsets = jnp.arange(block, dtype=jnp.int32)
    rows_kq = (num_kv_heads, chunk * group)

    def job(j, out):
        r = jnp.searchsorted(cu_jobs[1:], j, side="right").astype(jnp.int32)
        start = cu[r] + (j - cu_jobs[r]) * chunk
        row_ok = start + rows < cu[r + 1]  # rows past the request's tokens belong to a later job
        q_c = jax.lax.dynamic_slice_in_dim(qk, start, chunk, axis=1).reshape(rows_kq + (head_dim,))
        slots_c = jax.lax.dynamic_slice_in_dim(slots_pad, start, chunk)
        mask_c = None if mask_pad is None else jax.lax.dynamic_slice_in_dim(mask_pad, start, chunk)
        kv_len = kv_lens[r]
        table = jax.lax.dynamic_index_in_dim(page_table, r, keepdims=False)
        # Blocks past the job's last attendable slot are skipped: causally, the last token's slot.
        end = kv_len if mask_c is not None else jnp.minimum(kv_len, jnp.max(jnp.where(row_ok, slots_c, -1)) + 1)
        first_block = 0
        if window is not None:
            pos_c = jax.lax.dynamic_slice_in_dim(pos_pad, start, chunk)
            # Slots are not ordered by position in general: find the first one any row may see.
            lowest = jnp.min(jnp.where(row_ok, pos_c, jnp.iinfo(jnp.int32).max)) - window + 1
            kv_pos_r = kv_positions[table].reshape(padded_slots)
            seen = (kv_pos_r >= lowest) & slot_valid[table].reshape(padded_slots)
            first_block = jnp.argmax(seen) // block

        def attend_block(b, carry):
            peak, denom, acc = carry  # online softmax over the blocks seen so far
            pages = jax.lax.dynamic_slice_in_dim(table, b * block_pages, block_pages)
            k = k_pages[pages].reshape(block, num_kv_heads, head_dim).transpose(1, 0, 2).astype(jnp.float32)
            v = v_pages[pages].reshape(block, num_kv_heads, head_dim).transpose(1, 0, 2).astype(jnp.float32)
            slots = b * block + block_offsets
            allowed = (slot_valid[pages].reshape(block) & (slots < kv_len))[None, :]
            if mask_c is None:
                allowed = allowed & (slots[None, :] <= slots_c[:, None])
            else:
                allowed = allowed & jax.lax.dynamic_slice_in_dim(mask_c, b * block, block, axis=1)
            if window is not None:
                allowed = allowed & (pos_c[:, None] - kv_positions[pages].reshape(block)[None, :] < window)
            allowed = allowed[None, :, None, :]  # [1, chunk, 1, block]
            scores = jnp.einsum("kqd,ksd->kqs", q_c, k).reshape(num_kv_heads, chunk, group, block)
            scores = jnp.where(allowed, scores, -jnp.inf)
            new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1, keepdims=True))
            safe_peak = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            weights = jnp.where(allowed, jnp.exp(scores - safe_peak), 0.0)
            rescale = jnp.exp(peak - safe_peak)  # 0 while nothing was attendable (peak -inf)
            denom = denom * rescale + jnp.sum(weights, axis=-1, keepdims=True)
            pv = jnp.einsum("kqs,ksd->kqd", weights.reshape(rows_kq + (block,)), v)
            acc = acc * rescale + pv.reshape(num_kv_heads, chunk, group, head_dim)
            return new_peak, denom, acc

        stats = (num_kv_heads, chunk, group, 1)
        init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros((num_kv_heads, chunk, group, head_dim), jnp.float32))
        _, denom, acc = jax.lax.fori_loop(first_block, (end + block - 1) // block, attend_block, init)
        # A token with no attendable slot gets zeros instead of 0/0.
        o = acc / jnp.where(denom > 0, denom, 1.0)
        o = o.transpose(1, 0, 2, 3).reshape(chunk, num_q_heads, head_dim).astype(out.dtype)
        old = jax.lax.dynamic_slice_in_dim(out, start, chunk)
        o = jnp.where(row_ok[:, None, None], o, old)
        return jax.lax.dynamic_update_slice_in_dim(out, o, start, axis=0)

    out = jax.lax.fori_loop(0, cu_jobs[-1], job, jnp.zeros((num_tokens + chunk, num_q_heads, head_dim), q.dtype))
    return out[:num_tokens]
