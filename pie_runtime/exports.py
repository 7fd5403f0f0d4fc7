"""Named, shareable sets of KV pages: `export-pages`, `import-pages` and the persistent-export cache.

`ExportCatalog` is the export half of `pages.PageManager` (which mixes
it in and owns the state it uses: the instances' page tables, refcounts and
namespace bounds). An export is visible only inside its namespace. A
persistent export outlives its exporter and is a cache charged to its
namespace: past `PageBounds.exports` pages the namespace's least recently
used persistent exports are evicted, and under pool pressure those of ended
exporters go first (`evictable_exports`). An importer of an evicted name
gets `not-found`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import PieError

if TYPE_CHECKING:
    from .limits import PageBounds
    from .pages import InstancePages


@dataclass
class Export:
    """A named set of pages in a namespace. Reserved when `export-pages` is
    called, published (references taken) when its command reaches the head of
    the exporter's queue, withdrawn by `unexport`, by the exporter's end (if
    not persistent) or by eviction (persistent ones are a cache)."""

    name: str
    namespace: str
    owner: str  # instance id of the exporter
    virtual_ids: tuple[int, ...]
    last_page_len: int
    persistent: bool
    physical: tuple[int, ...] | None = None  # set when published
    withdrawn: bool = False
    last_used: int = 0  # LRU clock: publish and every import

    @property
    def published(self) -> bool:
        return self.physical is not None and not self.withdrawn


class ExportCatalog:
    """Exports of a `PageManager`: it provides the attributes below and the
    page-table methods these call (`instance`, `check_live`, `check_room`,
    `_bind`, `_new_id`, `_decref`)."""

    exports: dict[str, dict[str, Export]]
    refcount: dict[int, int]
    instances: dict[str, "InstancePages"]
    bounds: "PageBounds | None"
    page_size: int
    _clock: "itertools.count[int]"

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
        if persistent and self.bounds is not None and len(vids) > self.bounds.exports:
            raise PieError.out_of_memory(
                f"a persistent export of {len(vids)} pages exceeds the {self.bounds.exports} pages a namespace's "
                "persistent exports may hold")
        ns = self.exports.setdefault(inst.namespace, {})
        if name in ns:
            raise PieError.already_exists(f"an export named {name!r} already exists in namespace {inst.namespace!r}")
        exp = Export(name, inst.namespace, instance_id, tuple(vids), last_page_len, persistent)
        ns[name] = exp
        return exp

    def publish_export(self, exp: Export) -> int:
        """Takes the export's references, in the exporter's queue order (so the
        pages hold everything earlier commands wrote into them). A persistent
        export past its namespace's cap evicts that namespace's least
        recently used persistent exports; returns how many it evicted."""
        if exp.withdrawn:
            return 0
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
        exp.last_used = next(self._clock)
        return self._trim_exports(exp.namespace) if exp.persistent else 0

    def _trim_exports(self, namespace: str) -> int:
        if self.bounds is None:
            return 0
        evicted = 0
        while self.persistent_export_pages(namespace) > self.bounds.exports:
            oldest = min((e for e in self.exports.get(namespace, {}).values() if e.persistent and e.published),
                         key=lambda e: e.last_used)
            self.evict(oldest)
            evicted += 1
        return evicted

    def persistent_export_pages(self, namespace: str) -> int:
        pages: set[int] = set()
        for exp in self.exports.get(namespace, {}).values():
            if exp.persistent and exp.published:
                pages.update(exp.physical or ())
        return len(pages)

    def evictable_exports(self) -> list[Export]:
        """Persistent exports whose exporter has ended, least recently used first:
        a cache the pool may drop under pressure."""
        found = [e for ns in self.exports.values() for e in ns.values()
                 if e.persistent and e.published and e.owner not in self.instances]
        return sorted(found, key=lambda e: e.last_used)

    def evict(self, exp: Export) -> None:
        """Withdraws an export as if unexported: later imports of its name get not-found."""
        self.exports.get(exp.namespace, {}).pop(exp.name, None)
        self._withdraw(exp)

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
        self.check_room(instance_id, len(set(exp.physical) - set(inst.phys_count)))
        exp.last_used = next(self._clock)
        return [self._bind(inst, self._new_id(inst), phys) for phys in exp.physical], exp.last_page_len

    def list_exports(self, namespace: str) -> list[str]:
        return sorted(name for name, exp in self.exports.get(namespace, {}).items() if exp.published)

    def _withdraw(self, exp: Export) -> None:
        if exp.withdrawn:
            return
        exp.withdrawn = True
        if exp.physical is not None:
            for phys in exp.physical:
                self._decref(phys)

