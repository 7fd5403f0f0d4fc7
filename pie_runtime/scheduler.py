"""The engine thread: per-queue FIFOs -> batches -> engine steps.

One thread owns the engine. Each turn of its loop, with the core lock held:
run every queue's non-forward head commands (free, copy, mask, export,
synchronize) in queue order, return released pages to the pool, then ask the
batching policy (`policies`) whether to fire a step over the ready forwards
(at most one per queue). Forwards chosen for a step get copy-on-write for the
pages they write and are translated to physical pages (a forward whose pages
are gone fails alone; `Queue.forward` validated everything else at enqueue);
then the lock is released for the step itself, so instance threads keep
enqueueing while the engine runs, and the futures are resolved, also with
the lock released. If the engine still rejects a batch, its forwards run one
by one, fully validated, so only the bad one fails.

Under a token budget the policy may give a forward only a chunk of a step
(chunked prefill, `pie_runtime.chunking`): the forward then stays at the head
of its queue, and each turn runs its next chunk (made private and translated
anew: pages may have been shared or swapped out meanwhile) until its last
chunk settles its future with every chunk's results; a chunk that fails
fails the forward.

Released pages go back to the pool only while no step is in flight (see
`flush_released`), so a page is never reused while a step writes into it.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from engine_jax.batch import EngineInputError, ForwardRequest, OutputRequest, OutputResult, Sample

from .chunking import Chunk, ChunkProgress, next_chunk
from .commands import (
    CommandQueue,
    CopySlotsCmd,
    ForwardCmd,
    FreeCmd,
    MaskSlotsCmd,
    PublishExportCmd,
    SyncCmd,
    command_futures,
    settle,
)
from .errors import PieError
from .limits import PageBounds
from .pages import PageManager
from .policies import BatchPolicy, Pacing, Ready
from .pressure import Activity, MemoryArbiter, PageRequest
from .stats import ServingStats, StepEntry, step_seconds_bucket

log = logging.getLogger(__name__)


# Steps the scheduler remembers (`Scheduler.step_log`): who ran how many tokens in each.
STEP_LOG_LENGTH = 256


@dataclass
class _Prepared:
    cmd: ForwardCmd
    queue_id: int
    instance_id: str
    request: ForwardRequest
    chunk: Chunk

    @property
    def final(self) -> bool:
        """Whether this step runs the forward's last (or only) chunk."""
        return self.chunk.end == len(self.cmd.tokens)


class Scheduler:
    """Owns the engine thread. Every method except the loop is called with `cv` held."""

    def __init__(self, engine: Any, pages: PageManager, policy: BatchPolicy, cv: threading.Condition,
                 bounds: PageBounds, idle_victim_s: float) -> None:
        self.engine = engine
        self.pages = pages
        self.policy = policy
        self.cv = cv
        self.queues: dict[int, CommandQueue] = {}
        self.open_instances = 0
        self.stats = ServingStats()
        self.step_log: deque[tuple[StepEntry, ...]] = deque(maxlen=STEP_LOG_LENGTH)
        self.arbiter = MemoryArbiter(engine, pages, bounds, self.stats, self.flush_released, idle_victim_s)
        self._activity = Activity(self._priority, self._idle_since, self._has_work)
        self._last_active: dict[str, float] = {}  # instance -> when it last pushed or ran a command
        self._inflight: list[_Prepared] = []
        # Futures decided under the lock, settled once it is released.
        self._deferred: list[tuple[Future, Any, PieError | None]] = []
        # Pacing for the adaptive policy: the last step's queues that have not
        # issued their next forward yet, when that step ended and how long it took.
        self._awaited: set[int] = set()
        self._last_step_end = 0.0
        self._last_step_latency: float | None = None
        self._stepping = False
        self._stopping = False
        # The engine thread sleeps in a wait that ends by itself (see `pushed`).
        self._bounded_wait = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle (called without the lock) -------------------------------
    def start(self) -> None:
        with self.cv:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="pie-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self.cv:
            thread = self._thread
            self._stopping = True
            self.cv.notify_all()
        if thread is not None:
            thread.join()
        with self.cv:
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    # ---- called by the serving core with the lock held ----------------------
    def instance_opened(self, instance_id: str) -> None:
        self.open_instances += 1
        self._last_active[instance_id] = time.monotonic()

    def add_queue(self, queue: CommandQueue) -> None:
        self.queues[queue.id] = queue

    def pushed(self, queue: CommandQueue, cmd: Any) -> None:
        """Wakes the engine thread for a command just pushed (called with the lock held).

        Under the adaptive policy the engine thread, after a step, sleeps (with
        a bound) until the whole cohort of that step is back. A forward from a
        cohort member that is not the last one cannot change that decision, so
        it does not wake the thread: with N instances in a batch that is one
        wake-up per step instead of N, each of which would take the GIL from
        the instance threads that are racing to issue their next forward.
        """
        self._last_active[queue.instance_id] = time.monotonic()
        if queue.head() is not cmd:
            return  # the engine thread only looks at heads: one behind cannot change its decision
        if (self._bounded_wait and isinstance(cmd, ForwardCmd) and queue.id in self._awaited
                and len(self._awaited) > 1 and not self.policy.cohort_member_may_fire(len(cmd.tokens))):
            self._awaited.discard(queue.id)
            return
        self.cv.notify_all()

    def queue_closed(self, queue: CommandQueue) -> None:
        """A queue was closed (called with the lock held): the cohort no longer waits for it."""
        if queue.id in self._awaited:
            self._awaited.discard(queue.id)
            self.cv.notify_all()

    def instance_busy(self, instance_id: str) -> bool:
        """Whether the instance has commands queued or in flight."""
        return (any(q.commands for q in self.queues.values() if q.instance_id == instance_id)
                or any(p.instance_id == instance_id for p in self._inflight))

    def cancel_instance(self, instance_id: str) -> list[Future]:
        """Drops the instance's queues; returns the futures of its pending and
        in-flight commands for the caller to fail once it has released the lock."""
        futures: list[Future] = []
        for qid, queue in list(self.queues.items()):
            if queue.instance_id != instance_id:
                continue
            futures.extend(command_futures(queue.commands))
            queue.commands.clear()
            queue.closed = True
            del self.queues[qid]
        futures.extend(p.cmd.future for p in self._inflight if p.instance_id == instance_id)
        self.arbiter.drop_instance(instance_id)
        self._last_active.pop(instance_id, None)
        self.cv.notify_all()
        return futures

    def allocate(self, instance_id: str, count: int) -> list[int]:
        """Fresh page ids for the instance (called on its thread, with the lock
        held). Past its quota: out-of-memory at once. Else
        from free pages when no one is waiting ahead, or it waits for the
        engine thread to grant them (see `pie_runtime.pressure`); the lock is
        released while it waits. Safe while a step is in flight: a page in the
        pool's free list is in no request of that step, and the engine clears
        a fresh page before its next use."""
        if count == 0:
            return []
        self._last_active[instance_id] = time.monotonic()
        self.pages.check_room(instance_id, count)
        self.flush_released()
        if self.arbiter.can_take(instance_id, count) and not self.pages.instance(instance_id).suspended:
            near = self.pages.resident_page(instance_id)  # data-parallel replicas keep an instance on one
            return self.pages.allocate(instance_id, count, functools.partial(self._take_pages, near=near))
        if not self.running:
            raise PieError.out_of_memory(
                f"KV pool has {self.engine.pool.num_free} free pages, {count} requested, and the engine is "
                "stopped: nothing can make room")
        request = PageRequest(instance_id, count, "allocate")
        self.arbiter.add(request)
        self.stats.alloc_waits += 1
        self.cv.notify_all()
        self.cv.wait_for(lambda: request.done)
        if request.error is not None:
            raise request.error
        assert request.vids is not None
        return request.vids

    def _take_pages(self, count: int, near: int | None = None) -> list[int]:
        """`count` pages from the engine's pool, on the devices of physical page `near` if given."""
        try:
            return list(self.engine.pool.alloc(count, near=near))
        except EngineInputError as exc:  # OutOfPages: a bug in the accounting above (or, with
            # data-parallel replicas, the replica of `near` is full: the pool is accounted as a whole)
            raise PieError.out_of_memory(str(exc)) from exc

    def flush_released(self) -> None:
        """Returns pages no one holds any more to the pool, between steps only:
        a page released while a step is in flight (its holder closed mid-step)
        may still be written by that step, so it must not reach a new owner
        before the step has ended."""
        if self._stepping:
            return
        released = self.pages.take_released()
        if not released:
            return
        self.engine.pool.free(released)
        self.cv.notify_all()

    def idle(self) -> bool:
        """No queued work, nothing in flight and nothing waiting to go back to the pool."""
        return (
            not self._stepping
            and not self.pages.has_released()
            and not self.arbiter.requests
            and all(q.drained() for q in self.queues.values())
        )

    # ---- the loop ---------------------------------------------------------
    def _loop(self) -> None:
        with self.cv:
            while not self._stopping:
                try:
                    self._turn()
                except Exception:  # a bug in the runtime must not stop serving the others
                    log.exception("scheduler turn failed")
                    self.cv.wait(0.01)
            self.flush_released()

    def _turn(self) -> None:
        self._run_plain_commands()
        self.flush_released()  # frees just run, and pages released by closes
        retry = None
        if self.arbiter.active():
            retry = self.arbiter.serve(self._activity)
            self.cv.notify_all()  # allocations granted (or refused)
            self._run_plain_commands()  # restored instances, granted copies
        self._resolve_deferred()
        ready = self._ready()
        self._awaited = {
            qid for qid in self._awaited if qid in self.queues and not self.queues[qid].closed
        } - {r.queue_id for r in ready}
        pacing = Pacing(self.open_instances, len(self._awaited), self._last_step_end, self._last_step_latency)
        wait = self.policy.wait_time(ready, time.monotonic(), pacing)
        if retry is not None and (wait is None or wait > retry):
            wait = max(retry, 0.001)
        if wait is None or wait > 0:
            self.cv.notify_all()  # e.g. `wait_idle` callers: the queues may have just drained
            # Woken by an enqueue (see `pushed`), a close or a stop; a bounded
            # wait also ends by itself.
            self._bounded_wait = wait is not None
            try:
                self.cv.wait(wait)
            finally:
                self._bounded_wait = False
            return
        chosen = self.policy.select(ready)
        prepared = [p for p in (self._prepare(r.queue_id, r.num_tokens) for r in chosen) if p is not None]
        if prepared:
            self._step(prepared)
        else:
            self._resolve_deferred()

    def _resolve_deferred(self) -> None:
        """Settles the futures decided under the lock, with the lock released
        (see `_step`)."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []
        self.cv.release()
        try:
            for future, result, error in deferred:
                settle(future, result, error)
        finally:
            self.cv.acquire()

    def _ready(self) -> list[Ready]:
        ready = []
        for queue in self.queues.values():
            head = queue.head()
            if isinstance(head, ForwardCmd) and self._runnable(queue):
                ready.append(Ready(queue.id, queue.instance_id, queue.priority, head.remaining(), queue.head_since))
        return ready

    def _run_plain_commands(self) -> None:
        """Runs every non-forward command that is at the head of its queue
        (of a swapped-out instance, only frees and synchronizes: the rest
        need its pages)."""
        for qid, queue in list(self.queues.items()):
            suspended = self._suspended(queue.instance_id)
            while True:
                head = queue.head()
                if head is None or isinstance(head, ForwardCmd):
                    break
                if suspended and not isinstance(head, (FreeCmd, SyncCmd)):
                    break
                if not suspended and not self._memory_for(queue, self._plain_writes(head)):
                    break
                queue.pop()
                self._run_plain(queue, head)
            if queue.closed and queue.drained():
                del self.queues[qid]

    @staticmethod
    def _plain_writes(cmd: Any) -> tuple[int, ...]:
        """The pages a copy or mask writes (they must be private first)."""
        if isinstance(cmd, CopySlotsCmd):
            return (cmd.dst,) if cmd.count else ()
        if isinstance(cmd, MaskSlotsCmd):
            return (cmd.page,) if cmd.count else ()
        return ()

    def _memory_for(self, queue: CommandQueue, writes: Sequence[int]) -> bool:
        """Whether the pool can give the copy-on-write copies of the pages a
        head command writes now; if not, the queue waits for them (a
        `PageRequest`) and the command stays at its head."""
        inst = queue.instance_id
        try:
            need = self.pages.copies_needed(inst, writes)
        except PieError:
            return True  # past a quota, or gone: the command fails when it runs, alone
        if need == 0 or self.arbiter.take_reservation(queue.id, need) or self.arbiter.can_take(inst, need):
            return True
        self.arbiter.request_copy(inst, queue.id, need)
        return False

    def _suspended(self, instance_id: str) -> bool:
        inst = self.pages.instances.get(instance_id)
        return inst is not None and inst.suspended

    def _runnable(self, queue: CommandQueue) -> bool:
        return not self._suspended(queue.instance_id) and not self.arbiter.blocked(queue.id)

    # ---- what the memory arbiter asks ------------------------------------------
    def _priority(self, instance_id: str) -> int:
        return max((q.priority for q in self.queues.values() if q.instance_id == instance_id), default=0)

    def _idle_since(self, instance_id: str) -> float | None:
        if self.instance_busy(instance_id) or any(r.instance_id == instance_id for r in self.arbiter.requests):
            return None
        return self._last_active.get(instance_id)

    def _has_work(self, instance_id: str) -> bool:
        """A swapped-out instance has a command waiting that needs its pages."""
        return any(q.instance_id == instance_id and q.head() is not None
                   and not isinstance(q.head(), (FreeCmd, SyncCmd)) for q in self.queues.values())

    def _run_plain(self, queue: CommandQueue, cmd: Any) -> None:
        inst = queue.instance_id
        try:
            if isinstance(cmd, SyncCmd):
                error, queue.deferred_error = queue.deferred_error, None
                self._deferred.append((cmd.future, None, error))
            elif isinstance(cmd, FreeCmd):
                self.pages.release(inst, cmd.pages)
            elif isinstance(cmd, CopySlotsCmd):
                dst = self._exclusive(inst, cmd.dst)
                src = self.pages.physical(inst, cmd.src)
                if cmd.count:
                    self.engine.copy_slots(src, cmd.src_offset, dst, cmd.dst_offset, cmd.count)
            elif isinstance(cmd, MaskSlotsCmd):
                phys = self._exclusive(inst, cmd.page)
                if cmd.count:
                    self.engine.set_valid(phys, cmd.offset, cmd.count, not cmd.masked)
            elif isinstance(cmd, PublishExportCmd):
                try:
                    self.stats.exports_evicted += self.pages.publish_export(cmd.export)
                finally:
                    self.cv.notify_all()  # importers wait for it to be published or withdrawn
            else:
                raise AssertionError(f"unknown command {cmd!r}")
        except PieError as exc:
            queue.deferred_error = PieError(exc.code, f"an earlier {type(cmd).__name__} failed: {exc.message}")
        except Exception as exc:
            log.exception("command %r failed", cmd)
            queue.deferred_error = PieError.internal(f"{type(cmd).__name__} failed: {exc!r}")

    def _exclusive(self, instance_id: str, vid: int) -> int:
        before = self.pages.physical(instance_id, vid)
        alloc = functools.partial(self._take_pages, near=before)  # the copy goes where the page is
        after = self.pages.ensure_exclusive(instance_id, vid, alloc, self.engine.copy_page)
        if after != before:
            self.stats.pages_copied_on_write += 1
        return after

    def _prepare(self, queue_id: int, limit: int) -> _Prepared | None:
        """Takes the next chunk of the queue's head forward (all of it unless
        `limit`, the tokens the policy gave it, is less), makes the pages it
        writes private and translates it; a forward that cannot run fails here,
        alone. One whose copy-on-write copies the pool cannot give now stays
        at the head and its queue waits for them (None). The head is popped
        with its last chunk."""
        queue = self.queues[queue_id]
        cmd = queue.head()
        assert isinstance(cmd, ForwardCmd)
        chunk = next_chunk(cmd, limit, self.pages.page_size)
        written = chunk.written_pages(self.pages.page_size)
        if not self._memory_for(queue, written):
            return None
        if chunk.end == len(cmd.tokens):
            self._take_head(queue)
        inst = queue.instance_id
        if queue.deferred_error is not None:
            error, queue.deferred_error = queue.deferred_error, None
            self._fail(cmd, error, queue)
            return None
        if cmd.progress is not None:
            tokens = cmd.progress.tokens
        else:
            tokens = cmd.tokens
            if cmd.feeds_previous:
                drawn, queue.last_drawn = queue.last_drawn, None
                if drawn is None:
                    self._fail(cmd, PieError.invalid(
                        "feed-previous: the previous forward on this queue drew no token (or failed)"), queue)
                    return None
                tokens = (drawn,) + tokens[1:]
        whole = chunk.whole(cmd)
        try:
            for vid in written:
                self._exclusive(inst, vid)
            physical = [self.pages.physical(inst, vid) for vid in chunk.pages]
            # Queue.forward validated the command at enqueue; since then only
            # copy-on-write can have remapped its pages (to fresh private ones).
            request = ForwardRequest(
                tokens=tokens if whole else tokens[chunk.start:chunk.end],
                positions=cmd.positions if whole else cmd.positions[chunk.start:chunk.end],
                pages=physical,
                last_page_len=chunk.last_page_len,
                mask=chunk.mask,
                outputs=chunk.outputs,
            )
        except PieError as exc:
            self._fail(cmd, exc, queue)
            return None
        except EngineInputError as exc:
            self._fail(cmd, PieError.invalid(str(exc)), queue)
            return None
        except Exception as exc:  # e.g. the device failed a copy-on-write copy
            log.exception("preparing a forward failed")
            self._fail(cmd, PieError.internal(f"preparing the forward failed: {exc!r}"), queue)
            return None
        if not whole and cmd.progress is None:
            cmd.progress = ChunkProgress(tokens)
        return _Prepared(cmd, queue_id, inst, request, chunk)

    def _take_head(self, queue: CommandQueue) -> None:
        """Pops the queue's head; a closed queue goes away once drained."""
        queue.pop()
        if queue.closed and queue.drained():
            self.queues.pop(queue.id, None)

    def _fail(self, cmd: ForwardCmd, error: PieError, queue: CommandQueue | None) -> None:
        """Fails a forward as a whole (also one that has run some chunks: it leaves its queue)."""
        self.stats.forwards_failed += 1
        if queue is not None:
            queue.last_drawn = None
            if queue.head() is cmd:
                self._take_head(queue)
        self._deferred.append((cmd.future, None, error))

    def _step(self, batch: list[_Prepared]) -> None:
        """Runs one engine step with the lock released, then resolves the futures."""
        self._inflight = batch
        self._stepping = True
        deferred, self._deferred = self._deferred, []
        self.cv.release()
        for future, result, error in deferred:  # forwards that failed to prepare
            settle(future, result, error)
        started = time.monotonic()
        try:
            outcome = self._run_engine(batch)
        finally:
            ended = time.monotonic()
            self.cv.acquire()
            self._stepping = False
            self._inflight = []
            self.cv.notify_all()
        self._awaited = {p.queue_id for p in batch}
        for prepared in batch:
            self._last_active[prepared.instance_id] = ended
        self._last_step_end = ended
        self._last_step_latency = ended - started
        self.stats.engine_seconds += ended - started
        self.stats.step_seconds[step_seconds_bucket(ended - started)] += 1
        self.stats.steps += 1
        self.stats.batch_requests[len(batch)] += 1
        self.stats.batch_tokens[sum(len(p.request.tokens) for p in batch)] += 1
        self.step_log.append(tuple(StepEntry(p.instance_id, p.queue_id, len(p.request.tokens),
                                             None if p.chunk.whole(p.cmd) else (p.chunk.start, p.chunk.end))
                                   for p in batch))
        for prepared, (result, error) in zip(batch, outcome):
            self._record(prepared, result, error)
        # Resolve with the lock released: a waiting instance thread can enqueue
        # its next command at once, and a done-callback that calls back into
        # the core cannot deadlock on it.
        deferred, self._deferred = self._deferred, []
        self.cv.release()
        try:
            for future, result, error in deferred:
                settle(future, result, error)
        finally:
            self.cv.acquire()

    def _record(self, prepared: _Prepared, result: list[OutputResult] | None, error: PieError | None) -> None:
        """Takes in one request's share of a step: counts it, keeps a chunk's results,
        and queues the forward's future to settle once its last chunk ran (or one failed)."""
        cmd, chunk = prepared.cmd, prepared.chunk
        queue = self.queues.get(prepared.queue_id)  # None: closed (its futures failed already)
        if error is not None:
            self._fail(cmd, error, queue)
            return
        self.stats.tokens_processed += chunk.end - chunk.start
        self.stats.tokens_generated += sum(isinstance(o, Sample) for o in chunk.outputs)
        progress = cmd.progress
        if progress is not None:
            self.stats.prefill_chunks += 1
            progress.add(chunk, result)
            if not prepared.final:
                return
            self.stats.forwards_split += 1
            result = progress.results_in_order(len(cmd.outputs))
        self.stats.forwards_completed += 1
        if queue is not None:  # what a feed-previous pass queued behind this one will be fed
            queue.last_drawn = _last_drawn(cmd.outputs, result)
        self._deferred.append((cmd.future, result, None))

    def _run_engine(
        self, batch: list[_Prepared]
    ) -> list[tuple[list[OutputResult] | None, PieError | None]]:
        """One batched step; if the engine rejects the batch, each request runs
        alone so only the bad one fails. Called without the lock."""
        requests = [p.request for p in batch]
        try:
            return [(r, None) for r in self.engine.step(requests, validated=True)]
        except EngineInputError as exc:
            if len(batch) == 1:
                return [(None, PieError.invalid(str(exc)))]
        except Exception as exc:
            log.exception("engine step failed")
            error = PieError.internal(f"engine step failed: {exc!r}")
            return [(None, error)] * len(batch)
        outcome: list[tuple[list[OutputResult] | None, PieError | None]] = []
        for request in requests:
            outcome.extend(self._run_engine_single(request))
        return outcome

    def _run_engine_single(self, request: ForwardRequest) -> list[tuple[Any, PieError | None]]:
        try:
            return [(self.engine.step([request])[0], None)]
        except EngineInputError as exc:
            return [(None, PieError.invalid(str(exc)))]
        except Exception as exc:
            log.exception("engine step failed")
            return [(None, PieError.internal(f"engine step failed: {exc!r}"))]


def _last_drawn(outputs: Sequence[OutputRequest], results: list[OutputResult]) -> int | None:
    """The token of the forward's last sample output, if it has one."""
    for out, result in zip(reversed(outputs), reversed(results)):
        if isinstance(out, Sample):
            return int(result)
    return None
