"""KV page bookkeeping: per-instance virtual ids -> refcounted physical pages.

Every holder of a physical page owns one reference: each virtual id of each
instance that maps to it, and each published export. A page goes back to the
engine's pool only when its count reaches zero, and even then not at once: it
is parked in a release list that the scheduler thread drains between engine
steps, so a page can never be handed to a new owner while an in-flight step
still writes into it (an instance may close mid-step).

This module is pure bookkeeping: no threads, no engine calls. The caller (the
serving core) holds its lock around every method and passes in the two engine
operations it needs (`alloc_fn` to take pages from the pool, `copy_fn` to copy
a page for copy-on-write).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .errors import PieError

AllocFn = Callable[[int], list[int]]  # raises PieError out-of-memory when the pool is short
CopyFn = Callable[[int, int], None]  # copy_page(src_physical, dst_physical)

MAX_PAGE_ID = 2**32 - 1  # page ids are WIT u32


@dataclass
class Export:
    """A named set of pages in a namespace. Reserved when `export-pages` is
    called, published (references taken) when its command reaches the head of
    the exporter's queue, withdrawn by `unexport` or by the exporter's end."""

    name: str
    namespace: str
    owner: str  # instance id of the exporter
    virtual_ids: tuple[int, ...]
    last_page_len: int
    persistent: bool
    physical: tuple[int, ...] | None = None  # set when published
    withdrawn: bool = False

    @property
    def published(self) -> bool:
        return self.physical is not None and not self.withdrawn


@dataclass
class InstancePages:
    """One instance's page table."""

    instance_id: str
    namespace: str
    quota: int | None
    table: dict[int, int] = field(default_factory=dict)  # virtual -> physical
    # Ids whose free is queued but has not run yet: no new command may use them.
    doomed: set[int] = field(default_factory=set)
    next_id: int = 0

    def live(self, vid: int) -> bool:
        return vid in self.table and vid not in self.doomed


class PageManager:
    """Virtual page tables, physical refcounts, exports and copy-on-write."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.refcount: dict[int, int] = {}
        self.instances: dict[str, InstancePages] = {}
        self.exports: dict[str, dict[str, Export]] = {}  # namespace -> name -> export
        self._released: list[int] = []

    # ---- instances -------------------------------------------------------
    def open_instance(self, instance_id: str, namespace: str, quota: int | None) -> InstancePages:
        if instance_id in self.instances:
            raise PieError.invalid(f"instance {instance_id!r} is already open")
        if quota is not None and quota < 0:
            raise PieError.invalid(f"page quota must be >= 0, got {quota}")
        pages = InstancePages(instance_id, namespace, quota)
        self.instances[instance_id] = pages
        return pages

    def close_instance(self, instance_id: str) -> None:
        """Drops every reference the instance holds and withdraws its
        non-persistent exports (published or still pending)."""
        inst = self.instances.pop(instance_id, None)
        if inst is None:
            return
        for phys in inst.table.values():
            self._decref(phys)
        inst.table.clear()
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

    # ---- allocation ------------------------------------------------------
    def allocate(self, instance_id: str, count: int, alloc_fn: AllocFn) -> list[int]:
        """Fresh pages for the instance, all or nothing."""
        inst = self.instance(instance_id)
        if count < 0:
            raise PieError.invalid(f"cannot allocate {count} pages")
        if count == 0:
            return []
        if inst.quota is not None and len(inst.table) + count > inst.quota:
            raise PieError.out_of_memory(
                f"instance {instance_id!r} holds {len(inst.table)} pages; {count} more would "
                f"exceed its quota of {inst.quota}"
            )
        physical = alloc_fn(count)
        return [self._bind(inst, phys) for phys in physical]

    def _bind(self, inst: InstancePages, phys: int) -> int:
        vid = inst.next_id
        if vid > MAX_PAGE_ID:
            raise PieError.out_of_memory(f"instance {inst.instance_id!r} ran out of page ids")
        inst.next_id += 1
        inst.table[vid] = phys
        self.refcount[phys] = self.refcount.get(phys, 0) + 1
        return vid

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
        try:
            return inst.table[vid]
        except KeyError:
            raise PieError.not_found(f"page {vid} is not allocated in instance {instance_id!r}") from None

    def page_count(self, instance_id: str) -> int:
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
            phys = inst.table.pop(vid, None)
            inst.doomed.discard(vid)
            if phys is not None:
                self._decref(phys)

    # ---- copy-on-write ---------------------------------------------------
    def ensure_exclusive(self, instance_id: str, vid: int, alloc_fn: AllocFn, copy_fn: CopyFn) -> int:
        """Makes the instance's page `vid` private before a write and returns
        its physical id. A shared page (refcount > 1) is copied into a fresh
        page and only this holder is remapped; the others keep the original."""
        inst = self.instance(instance_id)
        phys = inst.table[vid]
        if self.refcount[phys] == 1:
            return phys
        (fresh,) = alloc_fn(1)
        copy_fn(phys, fresh)
        self.refcount[fresh] = 1
        inst.table[vid] = fresh
        self._decref(phys)
        return fresh

    # ---- exports ---------------------------------------------------------
    def reserve_export(
        self,
        instance_id: str,
        name: str,
        vids: Sequence[int],
        last_page_len: int,
        persistent: bool,
    ) -> Export:
        inst = self.instance(instance_id)
        if not name:
            raise PieError.invalid("export name must not be empty")
        if not vids:
            raise PieError.invalid("an export needs at least one page")
        if not 1 <= last_page_len <= self.page_size:
            raise PieError.invalid(f"last_page_len {last_page_len} is outside 1..{self.page_size}")
        self.check_live(instance_id, vids, distinct=True)
        ns = self.exports.setdefault(inst.namespace, {})
        if name in ns:
            raise PieError.already_exists(f"an export named {name!r} already exists in namespace {inst.namespace!r}")
        exp = Export(name, inst.namespace, instance_id, tuple(vids), last_page_len, persistent)
        ns[name] = exp
        return exp

    def publish_export(self, exp: Export) -> None:
        """Takes the export's references, in the exporter's queue order (so the
        pages hold everything earlier commands wrote into them)."""
        if exp.withdrawn:
            return
        inst = self.instance(exp.owner)
        missing = [vid for vid in exp.virtual_ids if vid not in inst.table]
        if missing:
            # Freed by a command on another of the exporter's queues, which
            # ran first: queues are not ordered with respect to each other.
            self.exports.get(exp.namespace, {}).pop(exp.name, None)
            exp.withdrawn = True
            raise PieError.not_found(f"export {exp.name!r}: page {missing[0]} was freed before the export took effect")
        physical = tuple(inst.table[vid] for vid in exp.virtual_ids)
        for phys in physical:
            self.refcount[phys] += 1
        exp.physical = physical

    def unexport(self, namespace: str, name: str) -> None:
        exp = self.exports.get(namespace, {}).pop(name, None)
        if exp is None:
            raise PieError.not_found(f"no export named {name!r}")
        self._withdraw(exp)

    def lookup_export(self, namespace: str, name: str) -> Export:
        exp = self.exports.get(namespace, {}).get(name)
        if exp is None:
            raise PieError.not_found(f"no export named {name!r}")
        return exp

    def import_export(self, instance_id: str, exp: Export) -> tuple[list[int], int]:
        """New virtual ids sharing the export's physical pages (zero-copy)."""
        inst = self.instance(instance_id)
        if not exp.published:
            raise PieError.not_found(f"export {exp.name!r} is not published")
        assert exp.physical is not None
        if inst.quota is not None and len(inst.table) + len(exp.physical) > inst.quota:
            raise PieError.out_of_memory(
                f"importing {len(exp.physical)} pages would exceed the quota of {inst.quota}"
            )
        return [self._bind(inst, phys) for phys in exp.physical], exp.last_page_len

    def list_exports(self, namespace: str) -> list[str]:
        return sorted(name for name, exp in self.exports.get(namespace, {}).items() if exp.published)

    def _withdraw(self, exp: Export) -> None:
        if exp.withdrawn:
            return
        exp.withdrawn = True
        if exp.physical is not None:
            for phys in exp.physical:
                self._decref(phys)

    # ---- release to the pool ----------------------------------------------
    def _decref(self, phys: int) -> None:
        count = self.refcount[phys] - 1
        if count < 0:
            raise AssertionError(f"refcount of physical page {phys} went negative")
        if count == 0:
            del self.refcount[phys]
            self._released.append(phys)
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
        """Physical pages with at least one holder."""
        return len(self.refcount)

    def check_invariants(self) -> None:
        """Refcounts equal the holders counted from scratch (used by tests and on close)."""
        expected: dict[int, int] = {}
        for inst in self.instances.values():
            for phys in inst.table.values():
                expected[phys] = expected.get(phys, 0) + 1
        for ns in self.exports.values():
            for exp in ns.values():
                if exp.published:
                    assert exp.physical is not None
                    for phys in exp.physical:
                        expected[phys] = expected.get(phys, 0) + 1
        if expected != self.refcount:
            raise AssertionError(f"refcounts {self.refcount} != holders {expected}")
        overlap = set(self._released) & set(self.refcount)
        if overlap:
            raise AssertionError(f"released pages still held: {sorted(overlap)}")
