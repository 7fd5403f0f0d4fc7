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

Pages are cleared on reuse: before a page freshly handed out by
``PagePool.alloc`` is used (by a step or any device op), ``clear_pages``
zeroes its K and V in every layer and clears its valid bits. A new owner
therefore finds exactly what a never-used page holds, whatever it does with
the slots (even making unwritten ones attendable), and its results are
bit-identical to those on a pool nobody used before.

``read_pages`` / ``write_pages`` move whole pages (K, V, valid bits) between
the pool and host memory: the serving core preempts an instance under memory
pressure by saving its pages on the host and restores them later.
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


def create_kv_cache(
    config: ModelConfig, num_pages: int, page_size: int, dtype: jnp.dtype, with_positions: bool = False
) -> KVCache:
    """A zeroed pool with every slot invalid (and slot positions when ``with_positions``)."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        slot_valid=jnp.zeros((num_pages, page_size), jnp.bool_),
        positions=jnp.zeros((num_pages, page_size), jnp.int32) if with_positions else None,
    )


def _clear_pages(cache: KVCache, pages: jax.Array) -> KVCache:
    """Zeroes K and V and invalidates every slot of ``pages`` (ids >= num_pages are padding: dropped)."""

    def zero(a: jax.Array) -> jax.Array:
        return a.at[pages].set(0, mode="drop")

    return KVCache(
        k=tuple(zero(a) for a in cache.k),
        v=tuple(zero(a) for a in cache.v),
        slot_valid=cache.slot_valid.at[pages].set(False, mode="drop"),
        positions=None if cache.positions is None else zero(cache.positions),
    )


def _read_pages(cache: KVCache, pages: jax.Array) -> tuple:
    positions = None if cache.positions is None else cache.positions[pages]
    return (tuple(a[pages] for a in cache.k), tuple(a[pages] for a in cache.v), cache.slot_valid[pages], positions)


def _write_pages(cache: KVCache, pages: jax.Array, k: tuple, v: tuple, valid: jax.Array,
                 positions: jax.Array | None) -> KVCache:
    def put(a: jax.Array, rows: jax.Array) -> jax.Array:
        return a.at[pages].set(rows.astype(a.dtype), mode="drop")

    return KVCache(
        k=tuple(put(a, rows) for a, rows in zip(cache.k, k)),
        v=tuple(put(a, rows) for a, rows in zip(cache.v, v)),
        slot_valid=put(cache.slot_valid, valid),
        positions=None if cache.positions is None else put(cache.positions, positions),
    )


clear_pages = jax.jit(_clear_pages, donate_argnums=(0,))
_read_jit = jax.jit(_read_pages)
_write_jit = jax.jit(_write_pages, donate_argnums=(0,))


@dataclass(frozen=True)
class HostPages:
    """Whole pages copied to host memory (row i is the i-th page read)."""

    k: tuple[np.ndarray, ...]  # per layer [n, page_size, num_kv_heads, head_dim]
    v: tuple[np.ndarray, ...]
    valid: np.ndarray  # bool[n, page_size]
    positions: np.ndarray | None = None  # int32[n, page_size] for pools that keep slot positions

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    @property
    def nbytes(self) -> int:
        extra = self.positions.nbytes if self.positions is not None else 0
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v) + self.valid.nbytes + extra

    def select(self, rows: Iterable[int]) -> "HostPages":
        """These rows only, in this order."""
        index = np.asarray(list(rows), dtype=np.int64)
        return HostPages(tuple(a[index] for a in self.k), tuple(a[index] for a in self.v), self.valid[index],
                         None if self.positions is None else self.positions[index])


def _padded_ids(pages: Iterable[int], pad: int) -> np.ndarray:
    """``pages`` padded to a power of two with ``pad`` (few compiled shapes)."""
    pages = [int(p) for p in pages]
    ids = np.full(1 << max(0, (len(pages) - 1).bit_length()), pad, np.int32)
    ids[:len(pages)] = pages
    return ids


def read_pages(cache: KVCache, pages: Iterable[int]) -> HostPages:
    """A host copy of whole pages of the pool."""
    pages = list(pages)
    k, v, valid, positions = jax.device_get(_read_jit(cache, _padded_ids(pages, 0)))
    n = len(pages)
    return HostPages(tuple(np.asarray(a[:n]) for a in k), tuple(np.asarray(a[:n]) for a in v),
                     np.asarray(valid[:n]), None if positions is None else np.asarray(positions[:n]))


def write_pages(cache: KVCache, pages: Iterable[int], host: HostPages) -> KVCache:
    """``cache`` with ``pages`` overwritten by ``host`` (as many rows as pages)."""
    pages = list(pages)
    if len(pages) != len(host):
        raise EngineInputError(f"{len(pages)} pages for {len(host)} saved pages")
    ids = _padded_ids(pages, cache.num_pages)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((len(ids) - len(a),) + a.shape[1:], a.dtype)]) if len(ids) > len(a) else a

    positions = None if cache.positions is None else pad(host.positions)
    return _write_jit(cache, ids, tuple(pad(a) for a in host.k), tuple(pad(a) for a in host.v), pad(host.valid),
                      positions)


class OutOfPages(EngineInputError):
    """The pool has fewer free pages than requested."""


class PagePool:
    """Host-side free list of physical page ids.

    Pages handed out by ``alloc`` are remembered until ``take_fresh`` so the
    engine can clear them (``clear_pages``) before their first use: a reused
    page must never expose its previous owner's KV.

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

    def alloc(self, n: int) -> list[int]:
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
        """Pages allocated since the last call (the engine clears them)."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
        return fresh
