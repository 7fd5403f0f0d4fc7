"""Memory pressure: who gets KV pages when the pool is short. Pauses, never kills.

An allocation the pool cannot serve now does not fail: it becomes a
`PageRequest` and waits. So does a copy-on-write copy a queued command needs
(its queue waits), and a preempted instance that has work again (it waits
to be restored). The engine thread serves them between steps (`serve`), in
one fair order, best first:

1. *within its namespace's fair share*: the namespace's resident pages fit
   in `pool / active namespaces` (a tenant past its share cannot push out
   one within it: to preempt another namespace's instance, a request must
   also keep its own namespace within its share once granted; between
   instances of one namespace this criterion does not apply);
2. higher queue priority (the instance's highest);
3. older instance (opened earlier).

Requests are served strictly in that order: one that cannot be served now
holds back those behind it, so a large request is not starved by small ones
(one that waits only for room under its namespace's quota holds back only
its namespace's). When the best request cannot be served from free pages,
the arbiter makes room: it first evicts the least recently used persistent
exports whose exporter has ended (a cache), then *preempts* victims:
instances ranking below the request in the same order, or idle for
`idle_victim_s` (nothing queued, nothing in flight, no request), lowest
first. Their pages are copied to host memory and freed
(`Engine.save_pages`); a page shared with others goes only if every
instance holding it is a victim, and every holder (exports too) keeps a
swap handle in its place (`PageManager.swap_out`). A preempted instance's
ids stay valid, its commands wait, and when it has work again it is restored
into fresh pages (`Engine.load_pages`) as a request of its own, in the same
order. The inferlet notices nothing but the delay: the pages come back bit
for bit, so its outputs are exactly those of an unpressured run. Preemption
happens only when it can actually satisfy the request, and at most
`swap_pages` pages are held on the host.

A request must fit both the pool and its namespace's quota, which bounds the
pages a namespace holds in the pool at once (its preempted pages do not
count); pages of the request's own namespace make room for both. A request
is refused (`out-of-memory`) only when it could never be served: when the
instance would hold more than its quota, which is never larger than its
namespace's or the pool (`PageManager.check_room`, checked before anything
waits).

Every method is called with the serving core's lock held; `serve` runs on
the engine thread (it does device work), between steps.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine_jax.batch import EngineInputError

from .errors import PieError
from .limits import PageBounds
from .pages import InstancePages, PageManager


@dataclass
class PageRequest:
    """Pages an instance waits for. kind: "allocate" (fresh ids for the
    caller), "copy" (copy-on-write copies for the command at the head of
    queue `queue_id`: granted pages stay reserved until it runs) or
    "restore" (only the instance's swapped pages back)."""

    instance_id: str
    count: int
    kind: str
    queue_id: int | None = None
    since: float = 0.0
    granted: bool = False
    vids: list[int] | None = None  # allocate: the ids granted
    error: PieError | None = None

    @property
    def done(self) -> bool:
        return self.granted or self.error is not None


@dataclass
class Activity:
    """What the scheduler knows about instances (callbacks, called with the lock held)."""

    priority: Callable[[str], int]  # the instance's highest queue priority
    idle_since: Callable[[str], float | None]  # None while it has work queued or in flight
    has_work: Callable[[str], bool]  # commands waiting that need its pages resident


class MemoryArbiter:
    """Waiting requests, fair order, export eviction, preemption and restore."""

    def __init__(self, engine: Any, pages: PageManager, bounds: PageBounds, stats: Any,
                 flush: Callable[[], None], idle_victim_s: float) -> None:
        self.engine = engine
        self.pages = pages
        self.bounds = bounds
        self.stats = stats
        self._flush = flush
        self.idle_victim_s = idle_victim_s
        self.requests: list[PageRequest] = []
        self.reserved = 0  # pages set aside for granted copy requests
        self._suspended_at: dict[str, float] = {}

    # ---- called on any thread -----------------------------------------------------
    def budget(self) -> int:
        """Free pages no granted request has set aside."""
        return self.engine.pool.num_free - self.reserved

    def can_take(self, instance_id: str, count: int) -> bool:
        """Whether the instance may take `count` pages now without jumping the queue."""
        return (self.budget() >= count and self._namespace_room(instance_id) >= count
                and not any(not r.granted for r in self.requests))

    def _namespace_room(self, instance_id: str) -> float:
        return self.pages.namespace_room(self.pages.instance(instance_id).namespace)

    def add(self, request: PageRequest) -> None:
        request.since = time.monotonic()
        self.requests.append(request)

    def blocked(self, queue_id: int) -> bool:
        """The queue's head waits for copy-on-write pages."""
        return any(r.queue_id == queue_id and not r.granted for r in self.requests)

    def take_reservation(self, queue_id: int, need: int) -> bool:
        """Consumes the queue's granted copy request; True if it covers `need`."""
        for r in self.requests:
            if r.queue_id == queue_id and r.granted:
                self._drop(r)
                return r.count >= need
        return False

    def request_copy(self, instance_id: str, queue_id: int, need: int) -> None:
        if not any(r.queue_id == queue_id for r in self.requests):
            self.add(PageRequest(instance_id, need, "copy", queue_id))

    def drop_instance(self, instance_id: str) -> None:
        """The instance closed: its requests go (a waiting allocation fails `closed`)."""
        for r in [r for r in self.requests if r.instance_id == instance_id]:
            if not r.done:
                r.error = PieError.closed(f"instance {instance_id!r} closed while waiting for KV pages")
            self._drop(r)
        since = self._suspended_at.pop(instance_id, None)
        if since is not None:
            self.stats.paused_seconds += time.monotonic() - since

    def suspended(self) -> list[str]:
        return list(self._suspended_at)

    def active(self) -> bool:
        """Whether `serve` has anything to do: requests, or swapped-out pages."""
        return bool(self.requests or self._suspended_at or self.pages.swapped_total())

    def paused_seconds(self) -> float:
        """Time preempted instances have spent swapped out, those still out included."""
        now = time.monotonic()
        return self.stats.paused_seconds + sum(now - t for t in self._suspended_at.values())

    def _drop(self, r: PageRequest) -> None:
        self.requests.remove(r)
        if r.kind == "copy" and r.granted:
            self.reserved -= r.count

    # ---- the engine thread ----------------------------------------------------------
    def serve(self, activity: Activity) -> float | None:
        """Grants what can be granted, in order, making room where that helps.
        Returns how soon to try again (an idle instance becomes a victim then),
        or None."""
        if not self.active():
            return None
        now = time.monotonic()
        self._flush()
        self._track_suspended(now)  # e.g. an import of a swapped-out export
        pending = [r for r in self.requests if not r.granted]
        waiting = {r.instance_id for r in pending}
        for instance_id in self._suspended_at:
            if instance_id not in waiting and activity.has_work(instance_id):
                pending.append(PageRequest(instance_id, 0, "restore", since=now))
        retry: float | None = None
        blocked: set[str] = set()  # namespaces whose best request waits for room under their quota
        for request in sorted(pending, key=lambda r: self._key(r.instance_id, 0, activity), reverse=True):
            inst = self.pages.instances.get(request.instance_id)
            if inst is None or inst.namespace in blocked:
                continue
            need = self._need(request)
            if not self._fits(request, need):
                retry = self._make_room(request, need, activity, now)
            if not self._fits(request, need):
                if need > self.budget():
                    break  # strict order: the rest wait behind it for the pool
                blocked.add(inst.namespace)  # its namespace's quota, not the pool: others go on
                continue
            self._grant(request, inst)
        return retry

    def _fits(self, request: PageRequest, need: int) -> bool:
        return need <= self.budget() and need <= self._namespace_room(request.instance_id)

    def _need(self, request: PageRequest) -> int:
        inst = self.pages.instances.get(request.instance_id)
        return request.count + (inst.swapped if inst is not None else 0)

    def _key(self, instance_id: str, extra: int, activity: Activity) -> tuple:
        inst = self.pages.instances[instance_id]
        active = len({i.namespace for i in self.pages.instances.values()})
        within_share = self.pages.namespace_resident(inst.namespace) + extra <= self.bounds.pool / max(1, active)
        return (within_share, activity.priority(instance_id), -inst.seq)

    def _grant(self, request: PageRequest, inst: InstancePages) -> None:
        if inst.swapped:
            try:
                self._restore(inst)
            except EngineInputError:  # data-parallel: its replica is full, though the pool is not
                return  # it waits (engine_jax.replicas: the pool is accounted as a whole)
        if request.kind == "restore":
            return
        request.granted = True
        if request.kind == "copy":
            self.reserved += request.count
            return
        self.requests.remove(request)
        self.stats.alloc_wait_seconds += time.monotonic() - request.since
        try:
            near = self.pages.resident_page(request.instance_id)
            request.vids = self.pages.allocate(request.instance_id, request.count,
                                               functools.partial(self.engine.pool.alloc, near=near))
        except PieError as exc:  # its quota changed meanwhile (e.g. a copy-on-write copy)
            request.granted, request.error = False, exc
        except EngineInputError as exc:  # data-parallel: the replica of its pages is full
            request.granted, request.error = False, PieError.out_of_memory(str(exc))

    def _make_room(self, request: PageRequest, need: int, activity: Activity, now: float) -> float | None:
        """Evicts cached exports, then preempts victims, until `request` fits
        both the pool and its namespace's quota (pages of its own namespace
        count for both). Preempts no one if that would not be enough."""
        namespace = self.pages.instance(request.instance_id).namespace

        def short() -> tuple[float, float]:
            return need - self.budget(), need - self.pages.namespace_room(namespace)

        for exp in self.pages.evictable_exports():
            pool_short, ns_short = short()
            if pool_short <= 0 and ns_short <= 0:
                return None
            if pool_short > 0 or exp.namespace == namespace:
                self.pages.evict(exp)
                self.stats.exports_evicted += 1
                self._flush()
        pool_short, ns_short = short()
        if pool_short <= 0 and ns_short <= 0:
            return None
        victims, retry = self._victims(request, need, activity, now)
        eligible = {instance_id for *_, instance_id in victims}
        # A page can go only if every instance holding it is a victim (exports keep a handle).
        holders = self.pages.page_holders()
        swappable = {p for p, ids in holders.items() if ids <= eligible}
        own = {p for p in swappable if self.pages.namespace_of(p) == namespace}
        room = min(len(swappable), self.bounds.swap - self.pages.swapped_total())
        if room < pool_short or min(len(own), room) < ns_short:
            return retry  # preempting would not be enough: wait
        for *_, instance_id in victims:
            pool_short, ns_short = short()
            if pool_short <= 0 and ns_short <= 0:
                break
            inst = self.pages.instances[instance_id]
            if pool_short <= 0 and inst.namespace != namespace:
                continue
            pages = [p for p in inst.phys_count if p in swappable]
            swappable.difference_update(pages)
            if pages:
                self._swap_out(pages, now)
        return retry

    def _victims(self, request: PageRequest, need: int, activity: Activity, now: float) -> tuple[list, float | None]:
        """Instances that may be preempted for `request`, first to go first:
        its own namespace's when that namespace is past its quota, idle ones,
        then lowest rank. And how soon another one becomes idle enough."""
        inst = self.pages.instance(request.instance_id)
        key = self._key(request.instance_id, need, activity)
        ns_short = need > self.pages.namespace_room(inst.namespace)
        victims, retry = [], None
        for other in self.pages.instances.values():
            if other.instance_id == request.instance_id:
                continue
            idle = activity.idle_since(other.instance_id)
            idle_for = None if idle is None else now - idle
            idle_enough = idle_for is not None and idle_for >= self.idle_victim_s
            rank = self._key(other.instance_id, 0, activity)
            same = other.namespace == inst.namespace
            if same:  # one namespace has one share: compare priority, then age
                rank, mine = rank[1:], key[1:]
            else:
                mine = key
            if not idle_enough and not rank < mine:
                if idle_for is not None:
                    wait = self.idle_victim_s - idle_for
                    retry = wait if retry is None else min(retry, wait)
                continue
            victims.append((not (same and ns_short), not idle_enough, rank[-2:], other.instance_id))
        victims.sort()
        return victims, retry

    def _swap_out(self, physical: list[int], now: float) -> None:
        saved = self.engine.save_pages(physical)
        self.pages.swap_out(physical, saved)
        self._flush()
        self.stats.pages_preempted += len(physical)
        self._track_suspended(now, preempted=True)

    def _restore(self, inst: InstancePages) -> None:
        handles = self.pages.swap_handles(inst.instance_id)
        physical = self.engine.pool.alloc(len(handles), near=self.pages.resident_page(inst.instance_id))
        batches: dict[int, tuple[Any, list[int], list[int]]] = {}
        for handle, phys in zip(handles, physical):
            saved, row = self.pages.saved_copy(handle)
            _, rows, pages = batches.setdefault(id(saved), (saved, [], []))
            rows.append(row)
            pages.append(phys)
        for saved, rows, pages in batches.values():
            self.engine.load_pages(pages, saved.select(rows))
        self.pages.restore(handles, physical)
        self.stats.restores += 1
        self._track_suspended(time.monotonic())

    def _track_suspended(self, now: float, preempted: bool = False) -> None:
        """Notes which instances hold swapped pages now: the newly suspended
        (preempted, when `preempted`) lose their copy reservations; the
        fully restored add their pause to the stats."""
        for instance_id, inst in self.pages.instances.items():
            if inst.suspended and instance_id not in self._suspended_at:
                self._suspended_at[instance_id] = now
                if preempted:
                    self.stats.preemptions += 1
                for r in [r for r in self.requests if r.instance_id == instance_id and r.kind == "copy" and r.granted]:
                    self._drop(r)  # asked again once it is back
        for instance_id in [i for i in self._suspended_at
                            if i in self.pages.instances and not self.pages.instances[i].suspended]:
            self.stats.paused_seconds += now - self._suspended_at.pop(instance_id)
