"""Paged attention as a Pallas kernel: ragged new tokens x paged KV x masks.

Same arguments and semantics as ``paged_attention_reference`` (see the package
docstring). The work is split in three stages:

1. **Plan (plain jnp, inside the caller's jit).** The ragged token batch is cut
   into *query blocks*: ``block_q`` consecutive new tokens of ONE request.
   ``num_blocks = min(T, ceil((T + R * (block_q - 1)) / block_q))`` is a
   static upper bound on how many blocks any ragged split of ``T`` tokens over
   ``R`` requests needs; unused blocks have no rows and walk no pages. Each
   block's queries are gathered into a dense tile ``[kv_heads, G * block_q,
   head_dim]`` whose rows are ``g * block_q + i`` (query head ``g`` of the kv
   head's group, token ``i``): GQA folds the group into the matmul's M
   dimension so a kv page is read once per group, and head-major rows make
   the per-token mask/slot expansion a plain repeat along rows. The per-slot
   valid bits and ``j < kv_lens[r]`` are folded into one per-request vector
   ``[R, slots]``, and each block gets a loop bound ``kv_end``: ``kv_lens[r]``
   with a custom mask, else ``min(kv_lens[r], max q_slot in the block + 1)``
   (causal blocks never touch pages past their last query's slot). With a
   sliding window by position, each block also gets ``kv_start``, the first
   slot that is valid and inside the window of one of its rows (slots are not
   ordered by position in general, so this is a search over the request's
   slots), and the page walk starts at its kv block.
2. **Kernel.** One program per (query block[, kv head]) runs an online
   (flash) softmax in float32 over its request's pages, ``pages_per_block``
   pages at a time, stopping at ``kv_end``. Masked scores become a large
   finite negative number and their probabilities are zeroed explicitly, so a
   row with nothing to attend keeps ``l == 0`` and outputs exact zeros (no
   ``inf - inf``).
3. **Unplan (jnp).** Each real token reads its row back out of its block;
   padding tokens get zeros.

Backends (two small bodies behind the one function, sharing the plan and the
softmax update):

* ``"gpu"`` (Pallas Triton): grid ``(num_blocks, kv_heads)``. Triton has no
  scalar prefetch, so the page ids come from a flat ``[R * max_pages]`` table
  read in-kernel, K/V pages are gathered with a vector of page ids from the
  whole pool (the kv head is squeezed by the BlockSpec), and the page walk is
  a ``lax.fori_loop`` with a dynamic trip count. Triton needs power-of-two
  tensor sizes: ``head_dim``, ``page_size``, ``block_q`` and
  ``pages_per_block`` must be powers of two; a non power-of-two GQA group is
  padded up (the extra query rows are discarded). ``G * block_q`` and
  ``pages_per_block * page_size`` should be >= 16 (tensor-core tiles); the
  defaults ensure it. float32 dots ask for ``HIGHEST`` precision, because the
  Triton lowering would otherwise use TF32.
* ``"tpu"`` (Mosaic): grid ``(num_blocks, max_pages / pages_per_block)`` with
  the kv-block axis "arbitrary". Block->request ids, loop bounds and the page
  table are scalar-prefetched into SMEM and drive the BlockSpec index maps, so
  Pallas' pipeline DMAs exactly the pages a block needs (one BlockSpec per page
  slot of the kv block, each page ``[page_size * kv_heads, head_dim]`` with
  all heads); kv blocks past ``kv_end`` repeat the last block index (no new
  DMA) and skip compute with ``pl.when``. Heads are a static loop inside the
  body; head ``h`` is the strided row slice ``h::kv_heads`` of a page. m/l/acc
  live in VMEM scratch across the kv axis. Lane rule: ``pages_per_block *
  page_size`` must be a multiple of 128 (or cover the whole table), which the
  default picks for page sizes dividing 128.

Limits: the whole (padded) page table sits in SMEM on TPU (rows x max_pages
int32); decode-only batches waste ``block_q - 1`` rows per block (decode is
bound by reading K/V, not by these rows); a long prefill is split into
independent query blocks that each re-read the shared prefix pages (no
cross-block reuse); the TPU grid visits ``max_pages / pages_per_block`` steps
per block even for short requests (skipped steps cost only the step overhead).
On CPU the kernel only runs with ``interpret=True`` (tests); production CPU
runs use the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from engine_jax.paged_attention.reference import check_window

Backend = Literal["gpu", "tpu"]

# Finite stand-in for -inf: keeps every exp() argument finite, so a fully masked
# row never computes inf - inf; its probabilities are zeroed explicitly anyway.
_MASKED = -1e30
# TPU vregs are 128 lanes wide; per-row softmax statistics are kept lane-replicated.
_LANES = 128


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a, b):
    return (a + b - 1) // b


def _cdiv_in_kernel(a: jax.Array, b: int) -> jax.Array:
    """ceil(a / b) for a >= 0 inside kernels and index maps.

    Truncating ``lax.div`` instead of ``//``: jnp's floor division emits a
    sign() fix-up that Mosaic lowers through device-specific code.
    """
    return lax.div(a + (b - 1), jnp.int32(b))


@dataclass(frozen=True)
class _Plan:
    """Static sizes shared by the plan, both kernel bodies and the unplan."""

    num_tokens: int
    num_requests: int
    num_kv_heads: int
    group: int  # query heads per kv head
    group_padded: int  # group rounded up for the backend (powers of two for Triton)
    head_dim: int
    page_size: int
    block_q: int
    pages_per_block: int
    max_pages_padded: int  # page-table width rounded up to whole kv blocks
    num_blocks: int

    @property
    def rows(self) -> int:
        return self.group_padded * self.block_q

    @property
    def kv_block(self) -> int:
        return self.pages_per_block * self.page_size

    @property
    def max_slots_padded(self) -> int:
        return self.max_pages_padded * self.page_size

    @property
    def num_kv_blocks(self) -> int:
        return self.max_pages_padded // self.pages_per_block


def _make_plan(
    q: jax.Array,
    k_pages: jax.Array,
    page_table: jax.Array,
    backend: Backend,
    block_q: int | None,
    pages_per_block: int | None,
) -> _Plan:
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_requests, max_pages = page_table.shape
    group = num_q_heads // num_kv_heads
    group_padded = _next_pow2(group) if backend == "gpu" else group
    if block_q is None:
        # Enough rows for one tensor-core/MXU tile even for decode-only batches;
        # longer ragged batches (prefill) get taller tiles for more reuse of each page.
        avg_tokens = max(1, num_tokens // max(1, num_requests))
        target_rows = 16 if avg_tokens <= 2 else 64
        multiple = 8 if backend == "tpu" else 1  # TPU: whole sublane tiles
        block_q = max(multiple, _next_pow2(max(1, target_rows // group_padded)))
    if pages_per_block is None:
        target = 64 if backend == "gpu" else _LANES
        pages_per_block = max(1, target // page_size)
        if backend == "tpu":
            # Lane rule: a kv block is a multiple of 128 slots or the whole table.
            pages_per_block = min(pages_per_block, max_pages)
    max_pages_padded = _cdiv(max_pages, pages_per_block) * pages_per_block
    num_blocks = max(1, min(num_tokens, _cdiv(num_tokens + num_requests * (block_q - 1), block_q)))
    return _Plan(
        num_tokens=num_tokens,
        num_requests=num_requests,
        num_kv_heads=num_kv_heads,
        group=group,
        group_padded=group_padded,
        head_dim=head_dim,
        page_size=page_size,
        block_q=block_q,
        pages_per_block=pages_per_block,
        max_pages_padded=max_pages_padded,
        num_blocks=num_blocks,
    )


@dataclass(frozen=True)
class _Blocks:
    """Per-query-block device arrays produced by the plan."""

    req: jax.Array  # int32[NB]: the block's request (clamped for empty blocks)
    kv_end: jax.Array  # int32[NB]: slots to walk (0 = walk nothing)
    q: jax.Array  # [NB, KVH, rows, D]
    row_slots: jax.Array  # int32[NB, rows]: q_slot per row, -1 for padding rows
    page_table: jax.Array  # int32[R * max_pages_padded], flat
    valid: jax.Array  # bool[R, max_slots_padded]: slot_valid & (j < kv_len)
    mask: jax.Array | None  # bool[NB, block_q, max_slots_padded]
    block_start: jax.Array  # int32[R]: first block of each request
    # Sliding window by position (None without a window):
    kv_start: jax.Array | None = None  # int32[NB]: first slot any row of the block may see
    row_pos: jax.Array | None = None  # int32[NB, rows]: position of each row's token
    kv_pos: jax.Array | None = None  # int32[R, max_slots_padded]: position of each slot's token


def _plan_blocks(
    plan: _Plan,
    q: jax.Array,
    slot_valid: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    q_slots: jax.Array,
    custom_mask: jax.Array | None,
    window: int | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> _Blocks:
    nb, bq, r = plan.num_blocks, plan.block_q, plan.num_requests
    cu = cu_q_lens.astype(jnp.int32)
    kv_lens = jnp.minimum(kv_lens.astype(jnp.int32), page_table.shape[1] * plan.page_size)
    q_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    blocks_per_req = _cdiv(q_lens, bq)
    block_end = jnp.cumsum(blocks_per_req).astype(jnp.int32)
    block_start = block_end - blocks_per_req

    b = jnp.arange(nb, dtype=jnp.int32)
    req = jnp.searchsorted(block_end, b, side="right").astype(jnp.int32)
    live = req < r
    req = jnp.minimum(req, r - 1)
    first_token = cu[req] + (b - block_start[req]) * bq
    num_rows = jnp.where(live, jnp.clip(cu[req + 1] - first_token, 0, bq), 0)

    token = first_token[:, None] + jnp.arange(bq, dtype=jnp.int32)[None, :]  # [NB, BQ]
    row_live = jnp.arange(bq, dtype=jnp.int32)[None, :] < num_rows[:, None]
    token = jnp.clip(token, 0, plan.num_tokens - 1)
    slots = jnp.where(row_live, q_slots.astype(jnp.int32)[token], -1)

    kv_len_b = jnp.where(live, kv_lens[req], 0)
    if custom_mask is None:
        kv_end = jnp.minimum(kv_len_b, jnp.max(slots, axis=1) + 1)
    else:
        kv_end = jnp.where(num_rows > 0, kv_len_b, 0)
    kv_end = jnp.maximum(kv_end, 0)

    kvh, g, gp, d = plan.num_kv_heads, plan.group, plan.group_padded, plan.head_dim
    qb = q[token].reshape(nb, bq, kvh, g, d)
    if gp != g:
        qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    qb = qb.transpose(0, 2, 3, 1, 4).reshape(nb, kvh, plan.rows, d)
    row_slots = jnp.broadcast_to(slots[:, None, :], (nb, gp, bq)).reshape(nb, plan.rows)

    mp, mpp, s = page_table.shape[1], plan.max_pages_padded, plan.page_size
    # Padding entries may be any valid page id; 0 always is one.
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, mpp - mp)))
    slot_ids = jnp.arange(plan.max_slots_padded, dtype=jnp.int32)
    valid = slot_valid[table].reshape(r, plan.max_slots_padded) & (slot_ids[None, :] < kv_lens[:, None])

    mask = None
    if custom_mask is not None:
        padded = jnp.pad(custom_mask.astype(jnp.bool_), ((0, 0), (0, (mpp - mp) * s)))
        mask = padded[token] & row_live[:, :, None]
    kv_start = row_pos = kv_pos = None
    if window is not None:
        pos = q_positions.astype(jnp.int32)[token]  # [NB, BQ]
        row_pos = jnp.broadcast_to(pos[:, None, :], (nb, gp, bq)).reshape(nb, plan.rows)
        kv_pos = kv_positions.astype(jnp.int32)[table].reshape(r, plan.max_slots_padded)
        lowest = jnp.min(jnp.where(row_live, pos, jnp.iinfo(jnp.int32).max), axis=1) - window + 1
        seen = (kv_pos[req] >= lowest[:, None]) & valid[req]
        kv_start = jnp.argmax(seen, axis=1).astype(jnp.int32)
    return _Blocks(
        req=req,
        kv_end=kv_end.astype(jnp.int32),
        q=qb,
        row_slots=row_slots,
        page_table=table.reshape(-1),
        valid=valid,
        mask=mask,
        block_start=block_start,
        kv_start=kv_start,
        row_pos=row_pos,
        kv_pos=kv_pos,
    )


def _unplan(plan: _Plan, out_blocks: jax.Array, blocks: _Blocks, cu_q_lens: jax.Array) -> jax.Array:
    nb, kvh, g, gp, bq, d = (
        plan.num_blocks,
        plan.num_kv_heads,
        plan.group,
        plan.group_padded,
        plan.block_q,
        plan.head_dim,
    )
    out = out_blocks.reshape(nb, kvh, gp, bq, d)[:, :, :g]
    out = out.transpose(0, 3, 1, 2, 4).reshape(nb * bq, kvh * g, d)
    cu = cu_q_lens.astype(jnp.int32)
    t = jnp.arange(plan.num_tokens, dtype=jnp.int32)
    # Last request starting at or before t: with empty requests in between, the
    # non-empty one that owns t is the last of the equal cu entries.
    r = jnp.clip(jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1, 0, plan.num_requests - 1)
    offset = t - cu[r]
    row = (blocks.block_start[r] + offset // bq) * bq + offset % bq
    live = t < cu[-1]
    row = jnp.where(live, jnp.clip(row, 0, nb * bq - 1), 0)
    return jnp.where(live[:, None, None], out[row], 0).astype(out_blocks.dtype)


def _expand_rows(x: jax.Array, group: int) -> jax.Array:
    """[block_q, n] per token -> [group * block_q, n] per row (rows are head-major)."""
    bq, n = x.shape
    return jnp.broadcast_to(x[None], (group, bq, n)).reshape(group * bq, n)


def _flash_update(
    q: jax.Array,  # [rows, D]
    k: jax.Array,  # [KB, D]
    v: jax.Array,  # [KB, D]
    allowed: jax.Array,  # bool[rows, KB]
    m_prev: jax.Array,  # f32[rows, 1]
    l_prev: jax.Array,  # f32[rows, 1]
    acc_prev: jax.Array,  # f32[rows, D]
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step over a kv block; the same math on both backends."""
    # float32 inputs get exact float32 products (Triton would use TF32 by default);
    # bf16 inputs use the native bf16 x bf16 -> f32 path.
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    s = jnp.where(allowed, s * scale, _MASKED)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(allowed, jnp.exp(s - m_next), 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    return m_next, l_next, alpha * acc_prev + pv


def _finish(acc: jax.Array, l: jax.Array) -> jax.Array:
    # l == 0 exactly when the row attended nothing; acc is 0 there too.
    return acc / jnp.where(l == 0.0, 1.0, l)


# --------------------------------------------------------------------------- GPU (Triton)


def _gpu_body(
    req_ref,  # int32[1]
    kv_end_ref,  # int32[1]
    table_ref,  # int32[R * MPp]
    valid_ref,  # bool[R * MSp]
    slots_ref,  # int32[rows]
    q_ref,  # [rows, D]
    k_ref,  # [P, S, D] (this kv head)
    v_ref,  # [P, S, D]
    *rest,
    plan: _Plan,
    scale: float,
    has_mask: bool,
    window: int | None,
):
    rest = list(rest)
    mask_ref = rest.pop(0) if has_mask else None  # bool[BQ, MSp]
    if window is not None:
        kv_start_ref, row_pos_ref, kv_pos_ref = rest[:3]  # int32[1], int32[rows], int32[R * MSp]
        rest = rest[3:]
    (o_ref,) = rest  # [rows, D]
    pb, kb_size, d = plan.pages_per_block, plan.kv_block, plan.head_dim
    req = req_ref[0]
    kv_end = kv_end_ref[0]
    q = q_ref[...]
    row_slots = slots_ref[...][:, None]
    rows = q.shape[0]

    def body(kb, carry):
        m, l, acc = carry
        start = kb * kb_size
        pages = table_ref[pl.ds(req * plan.max_pages_padded + kb * pb, pb)]
        k = k_ref[pages].reshape(kb_size, d)
        v = v_ref[pages].reshape(kb_size, d)
        allowed = valid_ref[pl.ds(req * plan.max_slots_padded + start, kb_size)][None, :]
        if has_mask:
            allowed = allowed & _expand_rows(mask_ref[:, pl.ds(start, kb_size)], plan.group_padded)
        else:
            j = start + jnp.arange(kb_size, dtype=jnp.int32)
            allowed = allowed & (j[None, :] <= row_slots)
        if window is not None:
            kv_pos = kv_pos_ref[pl.ds(req * plan.max_slots_padded + start, kb_size)]
            allowed = allowed & (row_pos[:, None] - kv_pos[None, :] < window)
        return _flash_update(q, k, v, allowed, m, l, acc, scale)

    init = (
        jnp.full((rows, 1), _MASKED, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    first = 0
    if window is not None:
        row_pos = row_pos_ref[...]
        first = lax.div(kv_start_ref[0], jnp.int32(kb_size))
    _, l, acc = lax.fori_loop(first, _cdiv_in_kernel(kv_end, kb_size), body, init)
    o_ref[...] = _finish(acc, l).astype(o_ref.dtype)


def _gpu_call(
    plan: _Plan, blocks: _Blocks, k_pages, v_pages, *, scale: float, window: int | None, interpret: bool | Any
) -> jax.Array:
    from jax.experimental.pallas import triton as plgpu

    p, s, kvh, d = k_pages.shape
    rows = plan.rows
    has_mask = blocks.mask is not None
    per_block = lambda b, h: (b,)  # noqa: E731
    whole = lambda b, h: (0,)  # noqa: E731
    in_specs = [
        pl.BlockSpec((1,), per_block),
        pl.BlockSpec((1,), per_block),
        pl.BlockSpec(blocks.page_table.shape, whole),
        pl.BlockSpec((plan.num_requests * plan.max_slots_padded,), whole),
        pl.BlockSpec((None, rows), lambda b, h: (b, 0)),
        pl.BlockSpec((None, None, rows, d), lambda b, h: (b, h, 0, 0)),
        pl.BlockSpec((p, s, None, d), lambda b, h: (0, 0, h, 0)),
        pl.BlockSpec((p, s, None, d), lambda b, h: (0, 0, h, 0)),
    ]
    args = [
        blocks.req,
        blocks.kv_end,
        blocks.page_table,
        blocks.valid.reshape(-1),
        blocks.row_slots,
        blocks.q,
        k_pages,
        v_pages,
    ]
    if has_mask:
        in_specs.append(pl.BlockSpec((None, plan.block_q, plan.max_slots_padded), lambda b, h: (b, 0, 0)))
        args.append(blocks.mask)
    if window is not None:
        in_specs += [
            pl.BlockSpec((1,), per_block),
            pl.BlockSpec((None, rows), lambda b, h: (b, 0)),
            pl.BlockSpec((plan.num_requests * plan.max_slots_padded,), whole),
        ]
        args += [blocks.kv_start, blocks.row_pos, blocks.kv_pos.reshape(-1)]
    kernel = functools.partial(_gpu_body, plan=plan, scale=scale, has_mask=has_mask, window=window)
    return pl.pallas_call(
        kernel,
        grid=(plan.num_blocks, kvh),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows, d), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(blocks.q.shape, blocks.q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="pie_paged_attention_gpu",
    )(*args)


# --------------------------------------------------------------------------- TPU (Mosaic)


def _tpu_body(
    req_ref,  # SMEM int32[NB]
    kv_end_ref,  # SMEM int32[NB]
    table_ref,  # SMEM int32[R * MPp]
    *rest,
    plan: _Plan,
    scale: float,
    has_mask: bool,
    window: int | None,
):
    rest = list(rest)
    kv_start_ref = rest.pop(0) if window is not None else None  # SMEM int32[NB]
    slots_ref, q_ref, valid_ref = rest[:3]  # [rows, 1], [KVH, rows, D], [1, KB] int32
    rest = rest[3:]
    pb, kvh, s = plan.pages_per_block, plan.num_kv_heads, plan.page_size
    k_refs, v_refs = rest[:pb], rest[pb : 2 * pb]
    rest = rest[2 * pb :]
    mask_ref = rest.pop(0) if has_mask else None
    if window is not None:
        row_pos_ref, kv_pos_ref = rest[:2]  # [rows, 1], [1, KB] int32
        rest = rest[2:]
    o_ref, m_ref, l_ref, acc_ref = rest
    b, kb = pl.program_id(0), pl.program_id(1)
    kb_size = plan.kv_block
    in_range = kb * kb_size < kv_end_ref[b]
    if window is not None:
        in_range = in_range & ((kb + 1) * kb_size > kv_start_ref[b])

    @pl.when(kb == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(in_range)
    def _step():
        allowed = valid_ref[...] != 0
        if has_mask:
            # Expand as int32 and compare after: Mosaic reshapes 32-bit vectors more readily than i1.
            allowed = allowed & (_expand_rows(mask_ref[...], plan.group_padded) != 0)
        else:
            j = kb * kb_size + lax.broadcasted_iota(jnp.int32, (1, kb_size), 1)
            allowed = allowed & (j <= slots_ref[...])
        if window is not None:
            allowed = allowed & (row_pos_ref[...] - kv_pos_ref[...] < window)
        for h in range(kvh):
            # Head h of a page [S * KVH, D] is every KVH-th row starting at h.
            k = jnp.concatenate([r[pl.ds(h, s, stride=kvh), :] for r in k_refs], axis=0)
            v = jnp.concatenate([r[pl.ds(h, s, stride=kvh), :] for r in v_refs], axis=0)
            m, l, acc = _flash_update(
                q_ref[h], k, v, allowed, m_ref[h][:, :1], l_ref[h][:, :1], acc_ref[h], scale
            )
            m_ref[h] = jnp.broadcast_to(m, m_ref.shape[1:])
            l_ref[h] = jnp.broadcast_to(l, l_ref.shape[1:])
            acc_ref[h] = acc

    @pl.when(kb == pl.num_programs(1) - 1)
    def _write():
        for h in range(kvh):
            o_ref[h] = _finish(acc_ref[h], l_ref[h][:, :1]).astype(o_ref.dtype)


def _tpu_call(
    plan: _Plan, blocks: _Blocks, k_pages, v_pages, *, scale: float, window: int | None, interpret: bool | Any
) -> jax.Array:
    from jax.experimental.pallas import tpu as pltpu

    p, s, kvh, d = k_pages.shape
    rows, pb, kb_size = plan.rows, plan.pages_per_block, plan.kv_block
    has_mask = blocks.mask is not None

    def needed_kv_block(b, kb, kv_end_ref, *kv_start_ref):
        # Steps outside the block's needed kv blocks keep the nearest needed index: Pallas skips the re-fetch.
        kb = jnp.minimum(kb, jnp.maximum(_cdiv_in_kernel(kv_end_ref[b], kb_size) - 1, 0))
        if kv_start_ref:
            kb = jnp.maximum(kb, lax.div(kv_start_ref[0][b], jnp.int32(kb_size)))
        return kb

    def page_map(i):
        def index(b, kb, req_ref, kv_end_ref, table_ref, *kv_start_ref):
            kb = needed_kv_block(b, kb, kv_end_ref, *kv_start_ref)
            return (table_ref[req_ref[b] * plan.max_pages_padded + kb * pb + i], 0, 0)

        return index

    def valid_map(b, kb, req_ref, kv_end_ref, table_ref, *kv_start_ref):
        return (req_ref[b], 0, needed_kv_block(b, kb, kv_end_ref, *kv_start_ref))

    def mask_map(b, kb, req_ref, kv_end_ref, table_ref, *kv_start_ref):
        return (b, 0, needed_kv_block(b, kb, kv_end_ref, *kv_start_ref))

    per_block = lambda b, kb, *_: (b, 0, 0)  # noqa: E731
    page_spec = lambda i: pl.BlockSpec((None, s * kvh, d), page_map(i))  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, rows, 1), per_block),
        pl.BlockSpec((None, kvh, rows, d), lambda b, kb, *_: (b, 0, 0, 0)),
        pl.BlockSpec((None, 1, kb_size), valid_map),
        *[page_spec(i) for i in range(pb)],
        *[page_spec(i) for i in range(pb)],
    ]
    # Pages as [P, S * KVH, D] (a free reshape): full-extent last two block dims.
    k_flat = k_pages.reshape(p, s * kvh, d)
    v_flat = v_pages.reshape(p, s * kvh, d)
    args = [
        blocks.row_slots[:, :, None],
        blocks.q,
        blocks.valid.astype(jnp.int32)[:, None, :],
        *([k_flat] * pb),
        *([v_flat] * pb),
    ]
    if has_mask:
        in_specs.append(pl.BlockSpec((None, plan.block_q, kb_size), mask_map))
        args.append(blocks.mask.astype(jnp.int32))
    scalars = [blocks.req, blocks.kv_end, blocks.page_table]
    if window is not None:
        in_specs += [pl.BlockSpec((None, rows, 1), per_block), pl.BlockSpec((None, 1, kb_size), valid_map)]
        args += [blocks.row_pos[:, :, None], blocks.kv_pos[:, None, :]]
        scalars.append(blocks.kv_start)
    kernel = functools.partial(_tpu_body, plan=plan, scale=scale, has_mask=has_mask, window=window)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(plan.num_blocks, plan.num_kv_blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, kvh, rows, d), lambda b, kb, *_: (b, 0, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((kvh, rows, _LANES), jnp.float32),
            pltpu.VMEM((kvh, rows, _LANES), jnp.float32),
            pltpu.VMEM((kvh, rows, d), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(blocks.q.shape, blocks.q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="pie_paged_attention_tpu",
    )(*scalars, *args)


# --------------------------------------------------------------------------- entry point


def default_backend() -> Backend:
    """The kernel body for this process: Mosaic on TPU, Triton otherwise (GPU, or CPU interpret)."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


@functools.partial(
    jax.jit, static_argnames=("scale", "window", "interpret", "backend", "block_q", "pages_per_block")
)
def paged_attention_kernel(
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
    interpret: bool | Any = False,
    backend: Backend | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Paged attention of ragged new tokens (see the package docstring for the semantics).

    ``interpret`` is passed to ``pallas_call``: True runs the kernel in
    Pallas' generic interpreter (CPU), a backend interpret-params object (e.g.
    ``pltpu.InterpretParams()``) in that backend's own interpreter.
    ``backend`` picks the kernel body (default: ``default_backend()``);
    ``block_q`` (tokens per query block) and ``pages_per_block`` (pages per kv
    step) override the tile sizes; see the module docstring for their rules.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, head_dim_k = k_pages.shape
    num_requests, max_pages = page_table.shape
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    if head_dim_k != head_dim:
        raise ValueError(f"q head_dim {head_dim} != kv head_dim {head_dim_k}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if slot_valid.shape != (num_pages, page_size):
        raise ValueError(f"slot_valid shape {slot_valid.shape} != {(num_pages, page_size)}")
    if kv_lens.shape != (num_requests,) or cu_q_lens.shape != (num_requests + 1,):
        raise ValueError(f"kv_lens {kv_lens.shape} / cu_q_lens {cu_q_lens.shape} do not match {num_requests} requests")
    if q_slots.shape != (num_tokens,):
        raise ValueError(f"q_slots shape {q_slots.shape} != {(num_tokens,)}")
    if custom_mask is not None and custom_mask.shape != (num_tokens, max_pages * page_size):
        raise ValueError(f"custom_mask shape {custom_mask.shape} != {(num_tokens, max_pages * page_size)}")
    check_window(window, q_positions, kv_positions, num_tokens, num_pages, page_size)
    if num_tokens == 0 or num_requests == 0:
        return jnp.zeros_like(q)

    backend = backend or default_backend()
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"unknown backend {backend!r}; choose 'gpu' or 'tpu'")
    plan = _make_plan(q, k_pages, page_table, backend, block_q, pages_per_block)
    blocks = _plan_blocks(plan, q, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask,
                          window, q_positions, kv_positions)
    call = _gpu_call if backend == "gpu" else _tpu_call
    out_blocks = call(plan, blocks, k_pages, v_pages, scale=scale, window=window, interpret=interpret)
    return _unplan(plan, out_blocks, blocks, cu_q_lens)
