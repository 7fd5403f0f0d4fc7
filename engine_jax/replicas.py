"""Data parallelism: several engine replicas behind the interface of one ``Engine``.

Each replica is a whole engine (weights and KV pool) on its own devices,
tensor parallel over them when asked. The serving core sees one engine whose
pool holds every replica's pages: page id ``p`` lives on replica
``p // pages_per_replica``. KV pages never move between replicas, so:

* **placement**: ``pool.alloc(n, near=page)`` takes pages on the replica of
  ``page``; the serving core passes a page the instance already holds (and
  the page being copied, for copy-on-write). An instance that holds no page
  yet goes to the replica with the most free pages. So an instance, with all
  its queues and forks, stays on one replica, and an instance whose first
  pages are imported runs on the replica of the export.
* **exports and imports across replicas are refused**: a forward whose pages
  live on two replicas (an import from another replica mixed with the
  instance's own pages) fails validation, and a copy between replicas fails,
  each with an error naming the replicas. Nothing is copied between replicas.
* a step runs each replica's share of the batch; every share is launched
  before any is waited for, so the replicas compute at the same time.
* saving pages to the host and loading them back (preemption under memory
  pressure, ``pie_runtime.pressure``) works on any replica: a host copy
  goes wherever its new pages are. The serving core's quotas and
  preemption count the pool as a whole, so an allocation whose replica is
  full fails with out-of-memory (a restore waits) even if another has room.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from engine_jax.batch import EngineInputError, ForwardRequest, OutputResult
from engine_jax.kv_cache import HostPages, OutOfPages, PagePool


class ReplicatedPagePool:
    """The replicas' page pools as one id space (replica ``r`` owns ids ``r * size ..``)."""

    def __init__(self, pools: Sequence[PagePool]) -> None:
        self.pools = list(pools)
        self.pages_per_replica = self.pools[0].num_pages
        if any(p.num_pages != self.pages_per_replica for p in self.pools):
            raise ValueError("data-parallel replicas must have pools of the same size")

    @property
    def num_pages(self) -> int:
        return self.pages_per_replica * len(self.pools)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    def replica_of(self, page: int) -> int:
        if not 0 <= page < self.num_pages:
            raise EngineInputError(f"page id {page} is out of range 0..{self.num_pages - 1}")
        return page // self.pages_per_replica

    def alloc(self, n: int, near: int | None = None) -> list[int]:
        """``n`` pages on the replica of page ``near``, or on the replica with the most free pages."""
        if near is None:
            replica = max(range(len(self.pools)), key=lambda r: self.pools[r].num_free)
        else:
            replica = self.replica_of(near)
        try:
            ids = self.pools[replica].alloc(n)
        except OutOfPages as exc:
            raise OutOfPages(f"data-parallel replica {replica}: {exc}") from None
        return [replica * self.pages_per_replica + i for i in ids]

    def free(self, ids) -> None:
        by_replica: dict[int, list[int]] = {}
        for page in ids:
            by_replica.setdefault(self.replica_of(int(page)), []).append(int(page) % self.pages_per_replica)
        for replica, local in by_replica.items():
            self.pools[replica].free(local)

    def is_allocated(self, page: int) -> bool:
        return 0 <= page < self.num_pages and self.pools[page // self.pages_per_replica].is_allocated(
            page % self.pages_per_replica)


class ReplicatedEngine:
    """``engines`` (same model, page size and pool size; each on its own devices) as one engine."""

    def __init__(self, engines: Sequence[Any]) -> None:
        if not engines:
            raise ValueError("a replicated engine needs at least one replica")
        self.replicas = list(engines)
        first = self.replicas[0]
        if any(e.page_size != first.page_size for e in self.replicas):
            raise ValueError("data-parallel replicas must have the same page size")
        self.model = first.model
        self.name: str = first.name
        self.config = first.config
        self.tokenizer = first.tokenizer
        self.page_size: int = first.page_size
        self.dtype = first.dtype
        self.platform: str = first.platform
        self.pool = ReplicatedPagePool([e.pool for e in self.replicas])
        self.num_pages: int = self.pool.num_pages

    def _locate(self, pages: Sequence[int], what: str = "pages") -> tuple[int, list[int]]:
        """(replica, local page ids) of pages that must all live on one replica."""
        size = self.pool.pages_per_replica
        replicas = {self.pool.replica_of(int(p)) for p in pages}
        if len(replicas) > 1:
            raise EngineInputError(
                f"{what} {list(pages)} live on data-parallel replicas {sorted(replicas)}: KV pages are not "
                f"shared between replicas (an export is importable only by instances on its replica)")
        return replicas.pop() if replicas else 0, [int(p) % size for p in pages]

    def _local_request(self, req: ForwardRequest) -> tuple[int, ForwardRequest]:
        replica, local = self._locate(_pages(req.pages), "pages")
        return replica, dataclasses.replace(req, pages=local)

    def validate(self, req: ForwardRequest, *, check_pages: bool = True) -> None:
        if not check_pages:  # the caller's own page ids, mapped to physical pages later: no replica yet
            self.replicas[0].validate(req, check_pages=False)
            return
        replica, local = self._local_request(req)
        self.replicas[replica].validate(local)

    def validate_output(self, out: Any, i: int, n: int) -> None:
        self.replicas[0].validate_output(out, i, n)

    def step(self, requests: Sequence[ForwardRequest], *, validated: bool = False) -> list[list[OutputResult]]:
        """One step per replica that has requests, all launched before any is waited for."""
        shares: dict[int, list[tuple[int, ForwardRequest]]] = {}
        for i, req in enumerate(requests):
            try:
                replica, local = self._local_request(req)
                if not validated:
                    self.replicas[replica].validate(local)
            except EngineInputError as exc:
                raise type(exc)(f"request {i}: {exc}") from None
            shares.setdefault(replica, []).append((i, local))
        launched = [(r, share, self.replicas[r].launch([req for _, req in share])) for r, share in shares.items()]
        results: list[list[OutputResult]] = [[] for _ in requests]
        for r, share, handle in launched:
            for (i, _), result in zip(share, self.replicas[r].finish(handle)):
                results[i] = result
        return results

    def copy_slots(self, src_page: int, src_offset: int, dst_page: int, dst_offset: int, count: int) -> None:
        replica, (src, dst) = self._locate([src_page, dst_page], "copy between pages")
        self.replicas[replica].copy_slots(src, src_offset, dst, dst_offset, count)

    def copy_page(self, src: int, dst: int) -> None:
        self.copy_slots(src, 0, dst, 0, self.page_size)

    def set_valid(self, page: int, offset: int, count: int, valid: bool) -> None:
        replica, (local,) = self._locate([page], "page")
        self.replicas[replica].set_valid(local, offset, count, valid)

    def save_pages(self, pages: Sequence[int]) -> HostPages:
        """Host copies of whole pages, from whichever replicas hold them (row i is ``pages[i]``)."""
        pages = _pages(pages)
        groups = self._by_replica(pages)
        parts = [self.replicas[r].save_pages([pages[i] % self.pool.pages_per_replica for i in rows])
                 for r, rows in groups.items()]
        order = [i for rows in groups.values() for i in rows]  # the rows of the concatenated parts
        where = {i: row for row, i in enumerate(order)}
        return HostPages.concat(parts).select(where[i] for i in range(len(pages)))

    def load_pages(self, pages: Sequence[int], saved: HostPages) -> None:
        """Writes saved pages into ``pages`` on whichever replicas hold them (host copies go anywhere)."""
        pages = _pages(pages)
        if len(pages) != len(saved):
            raise EngineInputError(f"{len(pages)} pages for {len(saved)} saved pages")
        for r, rows in self._by_replica(pages).items():
            self.replicas[r].load_pages([pages[i] % self.pool.pages_per_replica for i in rows], saved.select(rows))

    def _by_replica(self, pages: Sequence[int]) -> dict[int, list[int]]:
        """replica -> the positions in ``pages`` of its pages."""
        groups: dict[int, list[int]] = {}
        for i, page in enumerate(pages):
            groups.setdefault(self.pool.replica_of(page), []).append(i)
        return groups

    def slot_valid(self) -> np.ndarray:
        return np.concatenate([e.slot_valid() for e in self.replicas])


def _pages(pages: Any) -> list[int]:
    try:
        return [int(p) for p in pages]
    except (TypeError, ValueError) as exc:
        raise EngineInputError(f"pages must be a list of integers ({exc})") from None
