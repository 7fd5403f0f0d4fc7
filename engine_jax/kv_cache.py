"""The paged KV pool: device arrays plus the host-side free list of physical pages.

Layout: ``KVCache.k[layer]`` and ``KVCache.v[layer]`` are separate arrays of
shape ``[num_pages, page_size, num_kv_heads, head_dim]`` (one buffer per
layer, so a layer's pages feed attention or a kernel without slicing a
layer-stacked array, which would copy it). ``slot_valid[page, offset]`` is
False for slots excluded from all attention: never written, masked by the
application, or on a page freshly handed out by ``PagePool.alloc``.
``positions[page, offset]`` (only for models whose attention windows are by
position, e.g. Gemma 3's local layers; None otherwise) is the RoPE position
of the token written into the slot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax.batch import EngineInputError
from engine_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [num_pages, page_size, num_kv_heads, head_dim]
    v: tuple[jax.Array, ...]
    slot_valid: jax.Array  # bool[num_pages, page_size]
    positions: jax.Array | None = None  # int32[num_pages, page_size], or None

    @property
    def num_pages(self) -> int:
        return self.slot_valid.shape[0]

    @property
    def page_size(self) -> int:
        return self.slot_valid.shape[1]


def page_bytes(config: ModelConfig, page_size: int, dtype: jnp.dtype) -> int:
    """Device bytes one page takes across all layers (K, V and valid bits)."""
    per_layer = 2 * page_size * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    return config.num_layers * per_layer + page_size


def pages_for_budget(config: ModelConfig, page_size: int, dtype: jnp.dtype, memory_bytes: int) -> int:
    """How many pages fit in ``memory_bytes``; at least one page must fit."""
    size = page_bytes(config, page_size, dtype)
    count = int(memory_bytes) // size
    if count < 1:
        raise ValueError(f"a KV memory budget of {memory_bytes} bytes holds no page ({size} bytes each)")
    return count


def create_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype,
                    with_positions: bool = False, kv_sharding: jax.sharding.Sharding | None = None,
                    slot_sharding: jax.sharding.Sharding | None = None) -> KVCache:
    """A zeroed pool with every slot invalid (and slot positions when ``with_positions``); K/V
    and the per-slot arrays placed by the shardings when given (tensor parallel: K/V split over
    KV heads, the valid bits and positions whole on every device)."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    slots = (num_pages, page_size)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype, device=kv_sharding) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype, device=kv_sharding) for _ in range(config.num_layers)),
        slot_valid=jnp.zeros(slots, jnp.bool_, device=slot_sharding),
        positions=jnp.zeros(slots, jnp.int32, device=slot_sharding) if with_positions else None,
    )


class OutOfPages(EngineInputError):
    """The pool has fewer free pages than requested."""


class PagePool:
    """Host-side free list of physical page ids.

    Pages handed out by ``alloc`` are remembered until ``take_fresh`` so the
    engine can clear their valid bits before their first use: a reused page
    must never expose its previous owner's KV.

    Thread-safe: a server allocates and frees on its request threads while
    the engine thread takes the fresh pages at the start of a step.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self._num_pages = num_pages
        # Popping from the end hands out low ids first.
        self._free = list(range(num_pages - 1, -1, -1))
        self._is_free = np.ones(num_pages, dtype=bool)
        self._fresh: list[int] = []
        self._lock = threading.Lock()

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int, near: int | None = None) -> list[int]:
        """``n`` fresh page ids. ``near`` (a page id) asks for pages on the same devices as that
        page: it matters to a pool over data-parallel replicas (``engine_jax.replicas``), not here."""
        if n < 0:
            raise EngineInputError(f"cannot allocate a negative number of pages ({n})")
        with self._lock:
            if n > len(self._free):
                raise OutOfPages(
                    f"out of KV pages: requested {n}, only {len(self._free)} of {self._num_pages} free"
                )
            ids = [self._free.pop() for _ in range(n)]
            self._is_free[ids] = False
            self._fresh.extend(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._num_pages:
                raise EngineInputError(f"page id {i} is out of range 0..{self._num_pages - 1}")
        if len(set(ids)) != len(ids):
            raise EngineInputError(f"page ids to free contain duplicates: {ids}")
        with self._lock:
            already = [i for i in ids if self._is_free[i]]
            if already:
                raise EngineInputError(f"pages {already} are already free")
            self._is_free[ids] = True
            self._free.extend(reversed(ids))

    def is_allocated(self, page: int) -> bool:
        return 0 <= page < self._num_pages and not self._is_free[page]

    def take_fresh(self) -> list[int]:
        """Pages allocated since the last call (the engine clears their valid bits)."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
        return fresh
