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

``gather_pages`` / ``write_rows`` (with ``HostPages``) move whole pages (K, V,
valid bits, positions) between the pool and host memory: the serving core
preempts an instance under memory pressure by saving its pages on the host
and restores them later (``Engine.save_pages`` / ``load_pages``).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

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


@functools.lru_cache(maxsize=None)
def _read_to(sharding: jax.sharding.Sharding):
    return jax.jit(_read_pages, out_shardings=sharding)


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

    @staticmethod
    def concat(parts: Sequence["HostPages"]) -> "HostPages":
        """The rows of ``parts``, one after the other."""
        def cat(arrays):
            return np.concatenate(list(arrays))

        first = parts[0]
        return HostPages(tuple(cat(p.k[i] for p in parts) for i in range(len(first.k))),
                         tuple(cat(p.v[i] for p in parts) for i in range(len(first.v))),
                         cat(p.valid for p in parts),
                         None if first.positions is None else cat(p.positions for p in parts))

    @classmethod
    def from_rows(cls, rows: tuple, count: int) -> "HostPages":
        """From ``gather_pages``' arrays (fetched to the host), keeping the first ``count`` rows."""
        k, v, valid, positions = rows
        return cls(tuple(np.asarray(a[:count]) for a in k), tuple(np.asarray(a[:count]) for a in v),
                   np.asarray(valid[:count]), None if positions is None else np.asarray(positions[:count]))

    def rows(self, size: int) -> dict[str, np.ndarray | None]:
        """Host arrays for ``write_rows``, padded to ``size`` rows: K and V stacked over the layers
        ``[layers, size, ...]`` (a few arrays, whatever the depth: a multi-host leader sends them)."""
        def pad(a: np.ndarray) -> np.ndarray:
            extra = size - len(a)
            return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) if extra else a

        return {"k": np.stack([pad(a) for a in self.k]), "v": np.stack([pad(a) for a in self.v]),
                "valid": pad(self.valid), "positions": None if self.positions is None else pad(self.positions)}


def page_ids(pages: Iterable[int], pad: int) -> np.ndarray:
    """``pages`` padded to a power of two with ``pad`` (few compiled shapes)."""
    pages = [int(p) for p in pages]
    ids = np.full(1 << max(0, (len(pages) - 1).bit_length()), pad, np.int32)
    ids[:len(pages)] = pages
    return ids


def gather_pages(cache: KVCache, ids: np.ndarray, sharding: jax.sharding.Sharding | None = None) -> tuple:
    """Device copies of whole pages ``ids`` (from ``page_ids``): (K per layer, V per layer, valid
    bits, positions or None); placed by ``sharding`` when given (whole on every device of a
    tensor-parallel pool, whose K and V are split over its devices)."""
    return (_read_jit if sharding is None else _read_to(sharding))(cache, ids)


def write_rows(cache: KVCache, ids: np.ndarray, rows: dict[str, np.ndarray | None]) -> KVCache:
    """``cache`` with pages ``ids`` (from ``page_ids``, padded with ``num_pages``: dropped)
    overwritten by ``HostPages.rows``."""
    return _write_jit(cache, ids, tuple(rows["k"]), tuple(rows["v"]), rows["valid"],
                      None if cache.positions is None else rows["positions"])


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
        """Pages allocated since the last call (the engine clears them)."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
        return fresh
