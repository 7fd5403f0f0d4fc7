"""The paged attention op: ragged new tokens attending over a paged KV pool.

Arguments (shared by the reference and the Pallas kernel):

* ``q`` ``[T, num_q_heads, head_dim]``: the new tokens of all requests,
  flattened; request ``r`` owns ``q[cu_q_lens[r]:cu_q_lens[r+1]]``. Rows past
  ``cu_q_lens[-1]`` are padding (their output is any finite value).
* ``k_pages``, ``v_pages`` ``[num_pages, page_size, num_kv_heads, head_dim]``:
  one layer of the pool, the new tokens' K/V already written.
* ``slot_valid`` ``bool[num_pages, page_size]``: False removes a slot from
  all attention.
* ``page_table`` ``int32[R, max_pages]``: each request's physical pages in
  order (padding entries are any valid page id).
* ``kv_lens`` ``int32[R]``: slots in each request's sequence (0 = padding).
* ``cu_q_lens`` ``int32[R+1]``: cumulative new-token counts, starting at 0.
* ``q_slots`` ``int32[T]``: each new token's slot within its sequence.
* ``custom_mask`` ``bool[T, max_pages * page_size]`` or None: replaces the
  causal rule (``j <= q_slots[t]``) for every token when given.
* ``window`` (static int or None), ``q_positions`` ``int32[T]`` and
  ``kv_positions`` ``int32[num_pages, page_size]``: a sliding window by
  position (Gemma's local layers). With a window, slot ``j`` must also hold a
  token whose position ``p_j`` satisfies ``q_positions[t] - p_j < window``.

Token ``t`` of request ``r`` attends to slot ``j`` iff ``j < kv_lens[r]``,
the slot is valid, the causal rule (or ``custom_mask[t, j]``) holds, and ``j``
lies inside the window when one is given.
Query head ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)``. The
softmax runs in float32; a token with nothing to attend to outputs zeros.

``paged_attention`` picks the implementation: the Pallas kernel on GPU/TPU,
the jnp reference on CPU; ``PIE_ATTENTION=reference|kernel|interpret``
overrides the choice.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax

from engine_jax.paged_attention.reference import paged_attention_reference

AttentionFn = Callable[..., jax.Array]

IMPLEMENTATIONS = ("reference", "kernel", "interpret")

__all__ = ["AttentionFn", "IMPLEMENTATIONS", "paged_attention", "paged_attention_reference", "resolve_attention"]


def resolve_attention(choice: str | AttentionFn | None = None) -> AttentionFn:
    """The attention function for ``choice``: a name, a callable, or None (environment / platform default)."""
    if callable(choice):
        return choice
    return _by_name(choice or os.environ.get("PIE_ATTENTION") or _platform_default())


@functools.lru_cache(maxsize=None)
def _by_name(name: str) -> AttentionFn:
    # Cached so every engine gets the same (hashable) function and jit caches are shared.
    if name == "reference":
        return paged_attention_reference
    if name in ("kernel", "interpret"):
        try:
            from engine_jax.paged_attention.kernel import paged_attention_kernel
        except ImportError as exc:
            raise RuntimeError(f"attention implementation {name!r} needs engine_jax.paged_attention.kernel: {exc}") from exc
        return functools.partial(paged_attention_kernel, interpret=name == "interpret")
    raise ValueError(f"unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}")


def _platform_default() -> str:
    return "reference" if jax.default_backend() == "cpu" else "kernel"


def paged_attention(
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
    """Paged attention with the default implementation for this process (see module docstring)."""
    fn = resolve_attention(None)
    return fn(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask, scale=scale,
              window=window, q_positions=q_positions, kv_positions=kv_positions)
