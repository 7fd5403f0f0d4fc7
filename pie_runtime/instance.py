"""One running inferlet: a wasmtime Store on its own OS thread, with limits and a clean end.

Why a thread per instance: wasmtime-py releases the GIL while wasm runs and
host functions block on futures (a forward pass, a message), so a plain
thread per instance gives concurrency without async machinery in the guest.

Limits:
- Memory: the store's limiter caps linear memory; the guest's allocator sees
  `memory.grow` fail (CPython raises MemoryError inside the guest).
- CPU time: the shared engine runs with epoch interruption and a ticker
  thread bumps the epoch every `TICK_SECONDS`. When a store's deadline
  passes, wasmtime calls our callback *on the instance thread*, which reads
  `time.thread_time()`: CPU time of that thread only, so time spent blocked
  in a host wait (forward pass, receive) does not count. The callback also
  stops an instance that was asked to terminate.

Children (`runtime.launch`): an instance granted the `launch` capability
may start child instances of its own program or of one the operator
registered. Children get the parent's namespace and limits; what they send
goes to the parent's client. A client-launched instance and its descendants
form a launch tree whose size and summed memory limits the operator bounds
(`pie_runtime.limits`); every instance also counts against the server's
`max_instances` until its thread has ended. Whatever ends the parent, it terminates its running children
and waits for them before it reports its own outcome (structured
concurrency), so a parent's outcome means its whole tree has ended.

Whatever ends an instance (return, error, trap, limit, terminate), its
serving-core state, subscriptions and futures are released in `finally`.
`terminate` also releases them itself, from the terminating thread, with
the instance's children: a guest blocked in a WASI call (a `time.sleep`),
which wasmtime cannot interrupt, holds nothing of the server's after it.
How it ended is its `InstanceOutcome` (`pie_runtime.outcome`).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import wasmtime
from wasmtime import WasmtimeError
from wasmtime.component import Component

from pie_runtime.component_imports import check_imports
from pie_runtime.errors import PieError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.context import InstanceContext, bind_context
from pie_runtime.host.contract import RUN_INTERFACE
from pie_runtime.host.linker import make_wasi
from pie_runtime.host.registry import Host, Program
from pie_runtime.host.wasmtime_compat import install_epoch_deadline
from pie_runtime.limits import MIN_CHILD_MEMORY_BYTES
from pie_runtime.messaging import ClientChannel
from pie_runtime.outcome import InstanceOutcome, trap_message

log = logging.getLogger("pie_runtime.instance")

TICK_SECONDS = 0.01
# Most epoch ticks between two checks: bounds how late a terminate takes effect.
MAX_TICKS_BETWEEN_CHECKS = 10
DEFAULT_MEMORY_BYTES = 1 << 30
# How long a normally ended instance's queued commands may still run before
# the rest are cancelled (its last frees and exports must not be lost).
DRAIN_SECONDS = 60.0
# How long an ending parent waits for its terminated children to finish their teardown.
CHILD_STOP_SECONDS = 30.0
# How long after `terminate` an instance whose thread has not ended (it is
# blocked in a WASI call) gets its outcome anyway; everything it held was
# released at once by `terminate`.
TERMINATE_GRACE_SECONDS = 0.5


class EpochTicker:
    """Increments an engine's epoch every tick while at least one instance runs."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self.engine = engine
        self._users = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        with self._cv:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pie-epoch", daemon=True)
                self._thread.start()

    def release(self) -> None:
        with self._cv:
            self._users -= 1
            self._cv.notify_all()

    def _loop(self) -> None:
        with self._cv:
            while True:
                if self._users <= 0:
                    self._thread = None
                    return
                self._cv.wait(TICK_SECONDS)
                self.engine.increment_epoch()


_tickers: dict[int, EpochTicker] = {}
_tickers_lock = threading.Lock()


def _ticker_for(engine: wasmtime.Engine) -> EpochTicker:
    with _tickers_lock:
        ticker = _tickers.get(id(engine))
        if ticker is None or ticker.engine is not engine:
            ticker = _tickers[id(engine)] = EpochTicker(engine)
        return ticker


@dataclass
class InstanceLimits:
    cpu_seconds: float | None = None  # None = unlimited
    # Linear memory of the guest; None = as much as its launch tree has left.
    memory_bytes: int | None = DEFAULT_MEMORY_BYTES


class LaunchTree:
    """A client-launched instance and its descendants: the live instances and
    the linear-memory limits they hold between them (`TenantLimits`'
    `max_tree_instances` and `tree_memory_bytes`)."""

    def __init__(self) -> None:
        self.instances = 0
        self.memory_bytes = 0
        self.lock = threading.Lock()


_counter = itertools.count(1)


def new_instance_id() -> str:
    return f"{next(_counter)}-{uuid.uuid4().hex[:12]}"


class Instance:
    """A launched inferlet. `start()` runs it on its own thread; `wait()` returns its outcome."""

    def __init__(
        self,
        host: Host,
        component: Component,
        *,
        arguments: Sequence[str] = (),
        instance_id: str | None = None,
        client: ClientChannel | None = None,
        namespace: str = "default",
        limits: InstanceLimits | None = None,
        grant: Capabilities = Capabilities(),
        page_quota: int | None = None,
        program_name: str = "inferlet",
        manifest: Any | None = None,
        depth: int = 0,
        tree: LaunchTree | None = None,
    ) -> None:
        self.host = host
        self.component = component
        self.instance_id = instance_id or new_instance_id()
        self.client = client if client is not None else ClientChannel()
        self.limits = limits or InstanceLimits()
        self.grant = grant
        self.program_name = program_name
        self.context = InstanceContext(host, self.instance_id, arguments, self.client, namespace, page_quota)
        # What `launch("")` starts: this instance's own program, as declared.
        self.program = Program(program_name, component, manifest, grant)
        self.depth = depth  # 0 = launched by a client, 1 = its child, ...
        self.tree = tree if tree is not None else LaunchTree()
        self._memory_bytes = 0  # the linear-memory limit it holds in its tree, once admitted
        self.children: list[Instance] = []  # live ones, and ended ones until the next launch
        self._children_lock = threading.Lock()
        self.context.launcher = self._launch_child
        self.outcome: cf.Future[InstanceOutcome] = cf.Future()
        self._outcome_lock = threading.Lock()
        self.launched_at: float | None = None
        self._thread: threading.Thread | None = None
        self._stop_status: str | None = None  # set by the deadline callback when it stops wasm
        self._cpu_start = 0.0
        self._keepalive: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ control
    def start(self) -> "Instance":
        """Runs the instance on its own thread. `PieError` out-of-memory (and
        nothing started) past the server's or its launch tree's limits."""
        if self._thread is not None:
            raise RuntimeError("instance already started")
        self._admit()
        self.launched_at = time.perf_counter()
        self._thread = threading.Thread(target=self._main, name=f"pie-inst-{self.instance_id}", daemon=True)
        self._thread.start()
        return self

    def _admit(self) -> None:
        limits, tree = self.host.limits, self.tree
        with tree.lock:
            if tree.instances >= limits.max_tree_instances:
                raise PieError.out_of_memory(
                    f"its launch tree already has {tree.instances} live instances, the most allowed "
                    f"(max_tree_instances); wait for one to finish")
            left = limits.tree_memory_bytes - tree.memory_bytes
            wanted = self.limits.memory_bytes
            memory = left if wanted is None else min(wanted, left)
            if memory < (MIN_CHILD_MEMORY_BYTES if self.depth else 1):
                raise PieError.out_of_memory(
                    f"its launch tree's instances already hold {tree.memory_bytes >> 20} MiB of its "
                    f"{limits.tree_memory_bytes >> 20} MiB of memory (tree_memory_bytes)")
            self.host.admit(self.instance_id)
            tree.instances += 1
            tree.memory_bytes += memory
            self._memory_bytes = memory

    def _retire(self) -> None:
        with self.tree.lock:
            self.tree.instances -= 1
            self.tree.memory_bytes -= self._memory_bytes
        self.host.retire(self.instance_id)

    def terminate(self, reason: str = "terminated by the client") -> None:
        """Stops the instance and, from the calling thread, releases at once
        everything it holds: its children (terminated the same way), KV
        pages, queues, subscriptions and futures. A host wait returns at
        once and running wasm stops within a few ticks. A thread blocked in
        a WASI call (which wasmtime cannot interrupt) holds nothing of the
        server's any more; its outcome ("terminated") is reported
        `TERMINATE_GRACE_SECONDS` later if it has not ended by then, and the
        thread ends when its call returns."""
        self.context.stop(reason)
        for child in self._live_children():
            child.terminate(f"its parent {self.instance_id} ended")
        self.context.close()
        if self._thread is not None and not self.outcome.done():
            timer = threading.Timer(TERMINATE_GRACE_SECONDS, self._report_terminated, args=(reason,))
            timer.daemon = True
            timer.start()

    def _report_terminated(self, reason: str) -> None:
        if self.outcome.done():
            return
        self._settle(InstanceOutcome(
            self.instance_id, "terminated",
            error=f"instance stopped: {reason} (its thread is still in a WASI call and ends when the call returns)",
            wall_seconds=time.perf_counter() - (self.launched_at or time.perf_counter()),
            host_calls=self.context.host_calls, kv_pages_peak=self.context.kv_pages_peak))

    def _settle(self, outcome: InstanceOutcome) -> None:
        """The first outcome reported wins (the thread's own, or terminate's)."""
        with self._outcome_lock:
            if not self.outcome.done():
                self.outcome.set_result(outcome)

    def wait(self, timeout: float | None = None) -> InstanceOutcome:
        return self.outcome.result(timeout)

    @property
    def first_host_call_at(self) -> float | None:
        return self.context.first_call_at

    # ------------------------------------------------------------------ thread body
    def _main(self) -> None:
        ctx = self.context
        ticker = _ticker_for(self.host.wasm_engine)
        ticker.acquire()
        bind_context(ctx)
        self._cpu_start = time.thread_time()
        wall_start = time.perf_counter()
        sinks: list[Any] = []
        store: wasmtime.Store | None = None
        outcome: InstanceOutcome
        started = False
        outcome_ok = False
        try:
            store = wasmtime.Store(self.host.wasm_engine)
            store.set_limits(memory_size=int(self._memory_bytes))
            wasi, sinks = make_wasi(ctx, self.grant, self.program_name)
            store.set_wasi(wasi)
            self._install_deadline(store)
            try:
                instance = self.host.linker.instantiate(store, self.component)
            except WasmtimeError:
                check_imports(self.component, self.host.wasm_engine)  # names what the host lacks
                raise
            started = True
            run = _run_function(instance, store)
            result = run(store)
            outcome = self._outcome_of_result(result)
            outcome_ok = outcome.ok
        except WasmtimeError as e:
            status = self._stop_status or ("trap" if started else "start-failed")
            if ctx.stopped.done() and self._stop_status is None:
                status = "terminated"
            for sink in sinks:  # the guest's traceback, if it printed one, is in there
                sink.flush()
            error = trap_message(e, self._stop_reason(), ctx.host_trap, list(ctx.stderr_tail))
            outcome = InstanceOutcome(self.instance_id, status, error=error)
        except Exception as e:  # noqa: BLE001 - report, never kill the server
            outcome = InstanceOutcome(self.instance_id, "trap" if started else "start-failed",
                                      error=f"{type(e).__name__}: {e}")
        finally:
            for sink in sinks:
                sink.flush()
            self._end_children()
            ctx.close(drain_seconds=DRAIN_SECONDS if outcome_ok else 0.0)
            bind_context(None)
            if store is not None:
                store.close()
            ticker.release()
        outcome.cpu_seconds = time.thread_time() - self._cpu_start
        outcome.wall_seconds = time.perf_counter() - wall_start
        outcome.host_calls = ctx.host_calls
        outcome.kv_pages_peak = ctx.kv_pages_peak
        self._retire()
        self._settle(outcome)

    # ------------------------------------------------------------------ children
    def _launch_child(self, program: str, arguments: Sequence[str]) -> cf.Future:
        """runtime.launch: starts a child; a future of its result string (or PieError)."""
        if not self.grant.launch:
            raise PieError.unsupported(
                f"{self.program_name} was not granted the 'launch' capability: the inferlet must declare it "
                "(inferlet.declare(..., capabilities=['launch'])) and the operator allow it (pie-run --allow launch)")
        max_depth = self.host.limits.max_launch_depth
        if self.depth >= max_depth:
            raise PieError.unsupported(
                f"launch depth limit: this instance is {self.depth} levels below a client-launched one, "
                f"and children may go at most {max_depth} levels deep")
        target = self.program if program == "" else self.host.program(program)
        arguments = target.check_arguments(arguments)
        child_id = new_instance_id()
        parent_client = self.client
        # The child has no client of its own: it talks through the parent's.
        client = ClientChannel(on_send=lambda message: parent_client.send(f"[{child_id}] {message}"))
        client.close_input()
        child = Instance(self.host, target.component, arguments=arguments, instance_id=child_id,
                         client=client, namespace=self.context.namespace, limits=self.limits,
                         grant=target.grant, page_quota=self.context.page_quota,
                         program_name=target.name, manifest=target.manifest, depth=self.depth + 1,
                         tree=self.tree)
        result: cf.Future = cf.Future()
        child.outcome.add_done_callback(lambda done: _resolve_child_result(result, done.result()))
        with self._children_lock:
            if self.context.stopped.done():
                raise PieError.closed("this instance is being stopped")
            child.start()  # refused past the tree's limits
            self.children = [c for c in self.children if not c.outcome.done()] + [child]
        return result

    def _live_children(self) -> list["Instance"]:
        with self._children_lock:
            return [c for c in self.children if not c.outcome.done()]

    def _end_children(self) -> None:
        """Terminates the children still running (which releases what they
        hold at once) and waits for their outcomes."""
        children = self._live_children()
        for child in children:
            child.terminate(f"its parent {self.instance_id} ended")
        cf.wait([child.outcome for child in children], timeout=CHILD_STOP_SECONDS)
        for child in children:
            if not child.outcome.done():
                log.warning("instance %s: child %s still running %.0fs after termination",
                            self.instance_id, child.instance_id, CHILD_STOP_SECONDS)

    def _outcome_of_result(self, result: Any) -> InstanceOutcome:
        # result<string, string>: both cases are strings, so wasmtime-py tags it.
        tag, payload = getattr(result, "tag", None), getattr(result, "payload", None)
        if tag == "ok":
            return InstanceOutcome(self.instance_id, "ok", value=str(payload))
        if tag == "err":
            return InstanceOutcome(self.instance_id, "error", error=str(payload))
        return InstanceOutcome(self.instance_id, "trap", error=f"run returned an unexpected value {result!r}")

    def _stop_reason(self) -> str | None:
        return self.context.stopped.result() if self.context.stopped.done() else None

    # ------------------------------------------------------------------ CPU limit / terminate
    def _install_deadline(self, store: wasmtime.Store) -> None:
        # The callbacks must outlive the store that may call them.
        self._keepalive = install_epoch_deadline(store, self._check_deadline)
        store.set_epoch_deadline(self._ticks_until_check())

    def _ticks_until_check(self) -> int:
        limit = self.limits.cpu_seconds
        if limit is None:
            return MAX_TICKS_BETWEEN_CHECKS
        remaining = limit - (time.thread_time() - self._cpu_start)
        return max(1, min(MAX_TICKS_BETWEEN_CHECKS, int(remaining / TICK_SECONDS)))

    def _check_deadline(self) -> int | str:
        """Runs on the instance thread, inside wasm, when the epoch deadline
        passes: the ticks until the next check, or why the guest must stop."""
        if self.context.stopped.done():
            self._stop_status = "terminated"
            return f"instance stopped: {self.context.stopped.result()}"
        if self.limits.cpu_seconds is not None:
            used = time.thread_time() - self._cpu_start
            if used > self.limits.cpu_seconds:
                self._stop_status = "cpu-limit"
                return f"CPU time limit exceeded: used {used:.2f}s of {self.limits.cpu_seconds:g}s"
        return self._ticks_until_check()


def _resolve_child_result(result: cf.Future, outcome: InstanceOutcome) -> None:
    """A child's outcome as what its parent's `launch` future resolves to."""
    if outcome.ok:
        result.set_result(outcome.value or "")
        return
    code = "closed" if outcome.status == "terminated" else "internal"
    result.set_exception(PieError(code, f"child {outcome.instance_id} {outcome.status}: {outcome.error}"))


def _run_function(instance: Any, store: wasmtime.Store) -> Any:
    iface = instance.get_export_index(store, RUN_INTERFACE)
    index = instance.get_export_index(store, "run", iface) if iface is not None else None
    func = instance.get_func(store, index) if index is not None else None
    if func is None:
        raise WasmtimeError(f"the component does not export {RUN_INTERFACE}#run")
    return func
