"""KV page bookkeeping: per-instance virtual ids -> refcounted physical pages.

Every holder of a physical page owns one reference: each virtual id of each
instance that maps to it, and each published export. A page goes back to the
engine's pool only when its count reaches zero, and even then not at once: it
is parked in a release list that the scheduler thread drains between engine
steps, so a page can never be handed to a new owner while an in-flight step
still writes into it (an instance may close mid-step).

Accounting (what quotas count, see `pie_runtime.limits`): an instance holds
the distinct physical pages its ids map to, plus its pages swapped out to
host memory (all of them must fit the pool together for it to run, so its
quota is never more than its namespace's); a namespace holds in the pool the
distinct pages of its instances and its exports (pages are shared only inside
a namespace: forks, and imports of the namespace's own exports). A page
shared by several ids counts once; a copy-on-write copy is a new page and
counts.

Preemption (`pie_runtime.pressure`) moves pages to host memory
(`swap_out`): each becomes a *swap handle*, a negative page number that
every holder (ids of any instance, exports) keeps instead of the physical
page, until `restore` brings it back into a fresh page for all of them at
once. An instance holding any handle is suspended: it runs no command that
needs its pages until it is restored.

This module is pure bookkeeping: no threads, no engine calls. The caller (the
serving core) holds its lock around every method and passes in the engine
operations it needs (`alloc_fn` to take pages from the pool, `copy_fn` to
copy a page for copy-on-write).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .errors import PieError
from .exports import Export, ExportCatalog
from .limits import PageBounds

AllocFn = Callable[[int], list[int]]  # raises PieError out-of-memory when the pool is short
CopyFn = Callable[[int, int], None]  # copy_page(src_physical, dst_physical)

MAX_PAGE_ID = 2**32 - 1  # page ids are WIT u32


@dataclass
class InstancePages:
    """One instance's page table. Its pages are physical page numbers (>= 0)
    or swap handles (< 0, see `PageManager.swap_out`)."""

    instance_id: str
    namespace: str
    quota: int | None  # pages it may hold (None = no bound)
    seq: int  # open order: lower is older
    table: dict[int, int] = field(default_factory=dict)  # virtual -> page
    phys_count: dict[int, int] = field(default_factory=dict)  # page -> ids of this instance mapping to it
    # Ids whose free is queued but has not run yet: no new command may use them.
    doomed: set[int] = field(default_factory=set)
    next_id: int = 0
    swapped: int = 0  # distinct swap handles among its pages
    peak: int = 0  # most pages held at once

    def live(self, vid: int) -> bool:
        return vid in self.table and vid not in self.doomed

    def held(self) -> int:
        """Distinct pages held, resident or swapped out."""
        return len(self.phys_count)

    @property
    def suspended(self) -> bool:
        return self.swapped > 0


class PageManager(ExportCatalog):
    """Virtual page tables, physical refcounts, namespace accounting, exports, copy-on-write and swap."""

    def __init__(self, page_size: int, bounds: PageBounds | None = None) -> None:
        self.page_size = page_size
        self.bounds = bounds
        self.refcount: dict[int, int] = {}
        self.instances: dict[str, InstancePages] = {}
        self.exports: dict[str, dict[str, Export]] = {}  # namespace -> name -> export (see ExportCatalog)
        self._phys_ns: dict[int, str] = {}  # physical -> namespace of its holders
        self._ns_resident: dict[str, int] = {}
        self._ns_swapped: dict[str, int] = {}
        self._swapped: dict[int, tuple[Any, int]] = {}  # swap handle -> (saved pages, row)
        self._handles = itertools.count(1)
        self._released: list[int] = []
        self._seq = itertools.count()
        self._clock = itertools.count(1)

    # ---- instances -------------------------------------------------------
    def open_instance(self, instance_id: str, namespace: str, quota: int | None) -> InstancePages:
        if instance_id in self.instances:
            raise PieError.invalid(f"instance {instance_id!r} is already open")
        if quota is not None and quota < 0:
            raise PieError.invalid(f"page quota must be >= 0, got {quota}")
        if self.bounds is not None:
            bound = min(self.bounds.instance, self.bounds.namespace)
            quota = bound if quota is None else min(quota, bound)
        pages = InstancePages(instance_id, namespace, quota, next(self._seq))
        self.instances[instance_id] = pages
        return pages

    def close_instance(self, instance_id: str) -> None:
        """Drops every reference the instance holds (and its swapped pages) and
        withdraws its non-persistent exports (published or still pending)."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return
        for phys in inst.table.values():
            self._decref(phys)
        inst.table.clear()
        inst.phys_count.clear()
        inst.swapped = 0
        inst.doomed.clear()
        for ns in self.exports.values():
            for name, exp in list(ns.items()):
                if exp.owner != instance_id:
                    continue
                if exp.persistent and exp.published:
                    continue
                # A pending persistent export dies with its exporter: the
                # command that would publish it will never run.
                self._withdraw(exp)
                del ns[name]

    def withdraw_all_exports(self) -> None:
        """Server shutdown: persistent exports go too."""
        for ns in self.exports.values():
            for exp in ns.values():
                self._withdraw(exp)
        self.exports.clear()

    def instance(self, instance_id: str) -> InstancePages:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise PieError.closed(f"instance {instance_id!r} is not open")
        return inst

    # ---- accounting --------------------------------------------------------
    def namespace_held(self, namespace: str) -> int:
        return self._ns_resident.get(namespace, 0) + self._ns_swapped.get(namespace, 0)

    def namespace_resident(self, namespace: str) -> int:
        return self._ns_resident.get(namespace, 0)

    def namespace_room(self, namespace: str) -> float:
        """How many more pages the namespace may hold resident (its quota bounds
        what it holds in the pool at once; preempted pages do not count)."""
        if self.bounds is None:
            return float("inf")
        return self.bounds.namespace - self.namespace_resident(namespace)

    def check_room(self, instance_id: str, more: int) -> None:
        """Raises out-of-memory if the instance, holding `more` more pages,
        would exceed its quota (never more than its namespace's or the pool):
        a request that could never be served, since all of an instance's
        pages must be in the pool together for it to run."""
        inst = self.instance(instance_id)
        if more and inst.quota is not None and inst.held() + more > inst.quota:
            raise PieError.out_of_memory(
                f"instance {instance_id!r} holds {inst.held()} KV pages; {more} more would exceed its quota "
                f"of {inst.quota}" + ("" if self.bounds is None else
                                      f" (instance {self.bounds.instance}, namespace {self.bounds.namespace}, "
                                      f"pool {self.bounds.pool})"))

    # ---- allocation ------------------------------------------------------
    def allocate(self, instance_id: str, count: int, alloc_fn: AllocFn) -> list[int]:
        """Fresh pages for the instance, all or nothing."""
        self.instance(instance_id)
        if count < 0:
            raise PieError.invalid(f"cannot allocate {count} pages")
        if count == 0:
            return []
        self.check_room(instance_id, count)
        physical = alloc_fn(count)
        return self.bind_fresh(instance_id, physical)

    def resident_page(self, instance_id: str) -> int | None:
        """A physical page the instance holds in the pool, or None: its new pages are taken next to
        it (data-parallel replicas, ``engine_jax.replicas``, keep an instance on one replica)."""
        return next((p for p in self.instance(instance_id).phys_count if p >= 0), None)

    def bind_fresh(self, instance_id: str, physical: Sequence[int]) -> list[int]:
        """New ids for pages just taken from the pool (room already checked)."""
        inst = self.instance(instance_id)
        return [self._bind(inst, self._new_id(inst), phys) for phys in physical]

    def _new_id(self, inst: InstancePages) -> int:
        vid = inst.next_id
        if vid > MAX_PAGE_ID:
            raise PieError.out_of_memory(f"instance {inst.instance_id!r} ran out of page ids")
        inst.next_id += 1
        return vid

    def _bind(self, inst: InstancePages, vid: int, phys: int) -> int:
        inst.table[vid] = phys
        mine = inst.phys_count.get(phys, 0)
        inst.phys_count[phys] = mine + 1
        if mine == 0 and phys < 0:
            inst.swapped += 1
        count = self.refcount.get(phys, 0)
        if count == 0:
            self._phys_ns[phys] = inst.namespace
            counts = self._ns_resident if phys >= 0 else self._ns_swapped
            counts[inst.namespace] = counts.get(inst.namespace, 0) + 1
        self.refcount[phys] = count + 1
        inst.peak = max(inst.peak, inst.held())
        return vid

    def _unbind(self, inst: InstancePages, vid: int) -> int:
        phys = inst.table.pop(vid)
        left = inst.phys_count[phys] - 1
        if left:
            inst.phys_count[phys] = left
        else:
            del inst.phys_count[phys]
            if phys < 0:
                inst.swapped -= 1
        return phys

    # ---- lookups and validation -----------------------------------------
    def check_live(self, instance_id: str, vids: Iterable[int], *, distinct: bool = False) -> None:
        """Raises not-found for an id the instance does not hold (or has freed)."""
        inst = self.instance(instance_id)
        seen: set[int] = set()
        for vid in vids:
            if not inst.live(vid):
                state = "was freed" if vid in inst.doomed else "is not allocated"
                raise PieError.not_found(f"page {vid} {state} in instance {instance_id!r}")
            if distinct and vid in seen:
                raise PieError.invalid(f"page {vid} is listed twice")
            seen.add(vid)

    def physical(self, instance_id: str, vid: int) -> int:
        inst = self.instance(instance_id)
        phys = inst.table.get(vid)
        if phys is None or phys < 0:
            state = "is not allocated" if phys is None else "is swapped out"
            raise PieError.not_found(f"page {vid} {state} in instance {instance_id!r}")
        return phys

    def page_count(self, instance_id: str) -> int:
        """Ids the instance holds (a page shared by two of its ids counts twice)."""
        return len(self.instance(instance_id).table)

    # ---- free (two phases: doom now, release in queue order) -------------
    def doom(self, instance_id: str, vids: Sequence[int]) -> None:
        self.check_live(instance_id, vids, distinct=True)
        self.instance(instance_id).doomed.update(vids)

    def release(self, instance_id: str, vids: Sequence[int]) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:  # the instance closed; close_instance dropped everything
            return
        for vid in vids:
            inst.doomed.discard(vid)
            if vid in inst.table:
                self._decref(self._unbind(inst, vid))

    # ---- copy-on-write ---------------------------------------------------
    def copies_needed(self, instance_id: str, vids: Iterable[int]) -> int:
        """How many of the ids map to pages someone else also holds (a write
        copies them); out-of-memory if those copies would exceed the
        instance's quota."""
        inst = self.instance(instance_id)
        shared = [inst.table[vid] for vid in set(vids) if vid in inst.table and self.refcount[inst.table[vid]] > 1]
        self.check_room(instance_id, sum(1 for phys in shared if inst.phys_count[phys] > 1))
        return len(shared)

    def ensure_exclusive(self, instance_id: str, vid: int, alloc_fn: AllocFn, copy_fn: CopyFn) -> int:
        """Makes the instance's page `vid` private before a write and returns
        its physical id. A shared page (refcount > 1) is copied into a fresh
        page and only this holder is remapped; the others keep the original.
        The copy counts against the instance's quota (and is a new page of
        its namespace)."""
        inst = self.instance(instance_id)
        phys = inst.table[vid]
        if self.refcount[phys] == 1:
            return phys
        self.check_room(instance_id, 1 if inst.phys_count[phys] > 1 else 0)
        (fresh,) = alloc_fn(1)
        copy_fn(phys, fresh)
        self._unbind(inst, vid)
        self._bind(inst, vid, fresh)
        self._decref(phys)
        return fresh

    # ---- swap (preemption) ---------------------------------------------------
    def page_holders(self) -> dict[int, set[str]]:
        """Resident page -> the instances holding it (exports not included)."""
        holders: dict[int, set[str]] = {}
        for inst in self.instances.values():
            for phys in inst.phys_count:
                if phys >= 0:
                    holders.setdefault(phys, set()).add(inst.instance_id)
        return holders

    def swap_out(self, physical: Sequence[int], saved: Any) -> None:
        """The pages were copied to host memory (`saved`, row i -> physical[i]):
        every holder now keeps a swap handle instead, and the pages go back
        to the pool."""
        mapping = {}
        for row, phys in enumerate(physical):
            handle = -next(self._handles)
            self._swapped[handle] = (saved, row)
            mapping[phys] = handle
        self._remap(mapping)
        self._released.extend(physical)

    def namespace_of(self, page: int) -> str:
        return self._phys_ns[page]

    def swap_handles(self, instance_id: str) -> list[int]:
        """The swap handles among the instance's pages."""
        return [page for page in self.instance(instance_id).phys_count if page < 0]

    def saved_copy(self, handle: int) -> tuple[Any, int]:
        """(saved pages, row) of a swap handle."""
        return self._swapped[handle]

    def restore(self, handles: Sequence[int], physical: Sequence[int]) -> None:
        """The swapped pages were loaded into fresh `physical` pages: every holder gets them back."""
        self._remap(dict(zip(handles, physical)))
        for handle in handles:
            del self._swapped[handle]

    def swapped_total(self) -> int:
        return len(self._swapped)

    def _remap(self, mapping: dict[int, int]) -> None:
        """Moves every holder of each page `old` to `new` (swap out, restore)."""
        for inst in self.instances.values():
            moved = [old for old in inst.phys_count if old in mapping]
            if not moved:
                continue
            for vid, page in inst.table.items():
                if page in mapping:
                    inst.table[vid] = mapping[page]
            for old in moved:
                new = mapping[old]
                inst.phys_count[new] = inst.phys_count.pop(old)
                inst.swapped += (new < 0) - (old < 0)
        for ns in self.exports.values():
            for exp in ns.values():
                if exp.physical is not None and any(p in mapping for p in exp.physical):
                    exp.physical = tuple(mapping.get(p, p) for p in exp.physical)
        for old, new in mapping.items():
            self.refcount[new] = self.refcount.pop(old)
            namespace = self._phys_ns.pop(old)
            self._phys_ns[new] = namespace
            for page, step in ((old, -1), (new, 1)):
                counts = self._ns_resident if page >= 0 else self._ns_swapped
                counts[namespace] = counts.get(namespace, 0) + step

    # ---- release to the pool ----------------------------------------------
    def _decref(self, phys: int) -> None:
        count = self.refcount[phys] - 1
        if count < 0:
            raise AssertionError(f"refcount of physical page {phys} went negative")
        if count == 0:
            del self.refcount[phys]
            namespace = self._phys_ns.pop(phys)
            if phys >= 0:
                self._ns_resident[namespace] -= 1
                self._released.append(phys)
            else:  # a swapped page no one holds any more
                self._ns_swapped[namespace] -= 1
                del self._swapped[phys]
        else:
            self.refcount[phys] = count

    def take_released(self) -> list[int]:
        """Pages no one holds any more; the scheduler returns them to the pool."""
        released, self._released = self._released, []
        return released

    def has_released(self) -> bool:
        return bool(self._released)

    def released_count(self) -> int:
        return len(self._released)

    def held_pages(self) -> int:
        """Physical pages with at least one holder (swapped-out pages not included)."""
        return sum(1 for page in self.refcount if page >= 0)

    def check_invariants(self) -> None:
        """Refcounts and namespace counts equal the holders counted from scratch
        (used by tests and on close)."""
        expected: dict[int, int] = {}
        owners: dict[int, set[str]] = {}
        for inst in self.instances.values():
            counts: dict[int, int] = {}
            for phys in inst.table.values():
                expected[phys] = expected.get(phys, 0) + 1
                counts[phys] = counts.get(phys, 0) + 1
                owners.setdefault(phys, set()).add(inst.namespace)
            if counts != inst.phys_count:
                raise AssertionError(f"instance {inst.instance_id}: page counts {inst.phys_count} != {counts}")
            if inst.swapped != sum(1 for page in counts if page < 0):
                raise AssertionError(f"instance {inst.instance_id}: swapped count {inst.swapped} is wrong")
        for ns in self.exports.values():
            for exp in ns.values():
                if exp.published:
                    assert exp.physical is not None
                    for phys in exp.physical:
                        expected[phys] = expected.get(phys, 0) + 1
                        owners.setdefault(phys, set()).add(exp.namespace)
        if expected != self.refcount:
            raise AssertionError(f"refcounts {self.refcount} != holders {expected}")
        if set(self._swapped) != {page for page in expected if page < 0}:
            raise AssertionError(f"swap handles {sorted(self._swapped)} != held ones")
        if any(len(names) != 1 for names in owners.values()):
            raise AssertionError("a page is shared across namespaces")
        resident: dict[str, int] = {}
        swapped: dict[str, int] = {}
        for phys, names in owners.items():
            (name,) = names
            counts = resident if phys >= 0 else swapped
            counts[name] = counts.get(name, 0) + 1
            if self._phys_ns.get(phys) != name:
                raise AssertionError(f"page {phys} is charged to {self._phys_ns.get(phys)!r}, held by {name!r}")
        for mine, truth, what in ((self._ns_resident, resident, "resident"), (self._ns_swapped, swapped, "swapped")):
            if {k: v for k, v in mine.items() if v} != truth:
                raise AssertionError(f"namespace {what} pages {mine} != {truth}")
        overlap = set(self._released) & set(self.refcount)
        if overlap:
            raise AssertionError(f"released pages still held: {sorted(overlap)}")
