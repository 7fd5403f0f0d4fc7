"""The serving core: what the Wasm host binds the WIT `inference` interface to.

`ServingCore` owns the page manager and the engine thread; `InstanceState` is
one running inferlet; `Queue` (`queues.py`) is one of its command queues.

All mutable state is guarded by one lock (the condition `ServingCore._cv`).
Only the engine thread runs device work (steps, copies, masks, preemption);
instance threads touch just the engine's host-side page pool and `validate`,
under the lock (see `Scheduler.allocate`).
Futures are settled with the lock released, so their done-callbacks may call
back into the core (they run on the engine thread: keep them short).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .commands import CommandQueue, settle
from .errors import PieError
from .limits import TenantLimits
from .pages import PageManager
from .policies import BatchPolicy
from .queues import Queue, check_u32
from .scheduler import Scheduler
from .stats import ServingStats, StepEntry


class ServingCore:
    """Serves many inferlet instances on one engine.

    `policy` is one of `policies.POLICIES` ("adaptive" by default);
    `token_budget` caps new tokens per step, splitting longer forwards into
    chunks over several steps (chunked prefill), and `max_batch` caps
    requests per step (None = no cap); the `fixed_*` arguments tune the fixed-size and
    fixed-timeout policies, `adaptive_max_wait_ms` the adaptive one.
    `limits` bounds the KV pages of each instance and namespace (see
    `pie_runtime.limits`); under memory pressure allocations wait and
    instances idle for `idle_victim_ms` (or ranking below a waiting request)
    are preempted (see `pie_runtime.pressure`).
    """

    def __init__(
        self,
        engine: Any,
        *,
        policy: str = "adaptive",
        token_budget: int | None = None,
        max_batch: int | None = None,
        fixed_batch_size: int = 8,
        fixed_timeout_ms: float = 10.0,
        fixed_max_wait_ms: float = 1000.0,
        adaptive_max_wait_ms: float = 200.0,
        limits: TenantLimits | None = None,
        idle_victim_ms: float = 250.0,
    ) -> None:
        self.engine = engine
        self.page_size: int = engine.page_size
        self.limits = limits if limits is not None else TenantLimits()
        self.page_bounds = self.limits.page_bounds(engine.pool.num_pages)
        self._cv = threading.Condition(threading.Lock())
        self._pages = PageManager(self.page_size, self.page_bounds)
        self._policy = BatchPolicy(
            name=policy,
            token_budget=token_budget,
            max_batch=max_batch,
            fixed_batch_size=fixed_batch_size,
            fixed_timeout_s=fixed_timeout_ms / 1000.0,
            fixed_max_wait_s=fixed_max_wait_ms / 1000.0,
            adaptive_max_wait_s=adaptive_max_wait_ms / 1000.0,
        )
        self._scheduler = Scheduler(engine, self._pages, self._policy, self._cv, self.page_bounds,
                                    idle_victim_ms / 1000.0)
        self._instances: dict[str, InstanceState] = {}

    # ---- lifecycle --------------------------------------------------------
    def start(self) -> "ServingCore":
        self._scheduler.start()
        return self

    def stop(self) -> None:
        """Stops the engine thread and releases everything: commands still
        queued fail with `closed`, every instance is closed, every export
        (persistent ones too) withdrawn, and all pages go back to the pool."""
        self._scheduler.stop()
        for instance_id in list(self._instances):
            self.close_instance(instance_id, reason="the server stopped")
        with self._cv:
            self._pages.withdraw_all_exports()
            self._scheduler.flush_released()

    def __enter__(self) -> "ServingCore":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @property
    def running(self) -> bool:
        """Whether the engine thread is serving."""
        return self._scheduler.running

    # ---- instances --------------------------------------------------------
    def open_instance(self, instance_id: str, namespace: str = "default", page_quota: int | None = None) -> "InstanceState":
        with self._cv:
            self._pages.open_instance(instance_id, namespace, page_quota)
            state = InstanceState(self, instance_id, namespace)
            self._instances[instance_id] = state
            self._scheduler.instance_opened(instance_id)
            self._cv.notify_all()  # a fixed-size batch may be waiting on this count
            return state

    def close_instance(self, instance_id: str, reason: str = "ended") -> None:
        """Releases everything the instance holds: pending and in-flight
        commands fail with `closed`, its pages are dereferenced, its
        non-persistent exports withdrawn. Closing twice is harmless."""
        with self._cv:
            state = self._instances.pop(instance_id, None)
            if state is None:
                return
            state.closed = True
            self._scheduler.open_instances -= 1
            cancelled = self._scheduler.cancel_instance(instance_id)
            self._pages.close_instance(instance_id)
            self._scheduler.flush_released()  # unless a step is in flight: then the engine thread does
            self._cv.notify_all()
        error = PieError.closed(f"instance {instance_id!r} {reason}")
        for future in cancelled:
            settle(future, error=error)

    def drain_instance(self, instance_id: str, timeout: float) -> bool:
        """Waits until every command the instance queued has taken effect.

        An inferlet that returns normally may end on fire-and-forget commands
        (a persistent export, frees): they were issued, so they must run before
        `close_instance` cancels what is left. False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._scheduler.instance_busy(instance_id):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Short waits: not every command completion notifies this condition.
                self._cv.wait(min(remaining, 0.01))
        return True

    def instance(self, instance_id: str) -> "InstanceState":
        with self._cv:
            try:
                return self._instances[instance_id]
            except KeyError:
                raise PieError.not_found(f"no open instance {instance_id!r}") from None

    # ---- observation --------------------------------------------------------
    @property
    def stats(self) -> ServingStats:
        with self._cv:
            stats = self._scheduler.stats.copy()
            stats.paused_seconds = self._scheduler.arbiter.paused_seconds()
            return stats

    def recent_steps(self) -> list[tuple[StepEntry, ...]]:
        """The last engine steps (at most `scheduler.STEP_LOG_LENGTH`), oldest first:
        who ran how many new tokens in each, and which chunk of a split forward."""
        with self._cv:
            return list(self._scheduler.step_log)

    def instance_pages(self, instance_id: str) -> tuple[int, int]:
        """(pages it holds now, the most it held at once), resident or swapped
        out: what the server charges an open instance for."""
        with self._cv:
            inst = self._pages.instance(instance_id)
            return inst.held(), inst.peak

    def namespace_pages(self, namespace: str) -> int:
        """Pages a namespace's instances and exports hold (resident or swapped out)."""
        with self._cv:
            return self._pages.namespace_held(namespace)

    def suspended_instances(self) -> list[str]:
        """Instances preempted (their pages in host memory) right now."""
        with self._cv:
            return self._scheduler.arbiter.suspended()

    def free_pages(self) -> int:
        """Pages in the engine's pool that no one holds (including released
        pages the engine thread has not returned to the pool yet)."""
        with self._cv:
            return self.engine.pool.num_free + self._pages.released_count()

    def held_pages(self) -> int:
        """Physical pages with at least one holder (instance or export)."""
        with self._cv:
            return self._pages.held_pages()

    def refcount(self, instance_id: str, page: int) -> int:
        """How many holders share the physical page behind an instance's page id."""
        with self._cv:
            return self._pages.refcount[self._pages.physical(instance_id, page)]

    def check_invariants(self) -> None:
        with self._cv:
            self._pages.check_invariants()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Blocks until every queue is drained and released pages are back in
        the pool (needs the engine thread). True if it got there in time."""
        with self._cv:
            return self._cv.wait_for(self._scheduler.idle, timeout)


class InstanceState:
    """One running inferlet's share of the core."""

    def __init__(self, core: ServingCore, instance_id: str, namespace: str) -> None:
        self.core = core
        self.instance_id = instance_id
        self.namespace = namespace
        self.closed = False

    def create_queue(self, priority: int = 0) -> Queue:
        check_u32("priority", priority)
        with self.core._cv:
            self._check_open()
            cq = CommandQueue(self.instance_id, priority)
            self.core._scheduler.add_queue(cq)
            return Queue(self, cq)

    def page_count(self) -> int:
        with self.core._cv:
            self._check_open()
            return self.core._pages.page_count(self.instance_id)

    def close(self) -> None:
        self.core.close_instance(self.instance_id)

    def _check_open(self) -> None:
        if self.closed:
            raise PieError.closed(f"instance {self.instance_id!r} has ended")
