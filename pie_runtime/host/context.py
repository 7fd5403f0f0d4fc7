"""Per-instance state: what the host functions know about the instance calling them.

Host functions learn which instance is calling from a thread-local
(`bind_context` / `current_context`): each instance runs on its own OS
thread (see `pie_runtime.instance`) and wasm only ever calls back into
Python on the thread that entered it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Sequence

from wasmtime import WasmtimeError

from pie_runtime.errors import PieError
from pie_runtime.host.resource_table import ResourceTable, release
from pie_runtime.kvstore import NamespacedKV
from pie_runtime.messaging import ClientChannel, Subscription

if TYPE_CHECKING:
    from pie_runtime.host.registry import Host, ServedModel

log = logging.getLogger("pie_runtime.host")


class InstanceTerminated(Exception):
    """Raised inside a host wait when the instance has been told to stop."""


class InstanceContext:
    """Everything the host functions need about one running instance."""

    def __init__(
        self,
        host: Host,
        instance_id: str,
        arguments: Sequence[str],
        client: ClientChannel,
        namespace: str,
        page_quota: int | None,
    ) -> None:
        self.host = host
        self.instance_id = instance_id
        self.arguments = list(arguments)
        self.client = client
        self.namespace = namespace
        self.page_quota = page_quota
        self.kv: NamespacedKV = host.kvstore.namespace(namespace)
        self.table = ResourceTable()
        self.subscriptions: set[Subscription] = set()
        self._states: dict[str, Any] = {}  # model name -> serving core InstanceState
        self._states_lock = threading.Lock()
        # Resolved (with the reason) when the instance must stop; every blocking
        # host wait also waits on it, so a stop never hangs on a future.
        self.stopped: cf.Future = cf.Future()
        # A binary semaphore (a lock nobody owns): released by `_wake` when a
        # future this instance waits on resolves, or when it is stopped.
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        # Futures that already call `_wake` when they resolve.
        self._watched: weakref.WeakSet[cf.Future] = weakref.WeakSet()
        self.first_call_at: float | None = None
        self.host_calls = 0
        # Why the last trapping host call trapped: wasmtime may report a later,
        # less helpful error for the same trap.
        self.host_trap: str | None = None
        # The guest's last stderr lines: a Python guest prints its traceback
        # there before it traps, which makes the outcome's error readable.
        self.stderr_tail: deque[str] = deque(maxlen=64)
        # Starts a child instance (program name, arguments) -> future of its
        # result; set by the Instance, which knows its program and limits.
        self.launcher: Callable[[str, Sequence[str]], cf.Future] | None = None
        # The most KV pages the server charged this instance at once (read when it closes).
        self.kv_pages_peak = 0
        self._closed = False

    # ---------------------------------------------------------------- serving core
    def state_for(self, served: ServedModel) -> Any:
        """This instance's serving-core state on `served`, opened on first use."""
        with self._states_lock:
            if self._closed:
                raise PieError.closed("instance has ended")
            state = self._states.get(served.name)
            if state is None:
                state = served.core.open_instance(self.instance_id, namespace=self.namespace,
                                                  page_quota=self.page_quota)
                self._states[served.name] = state
            return state

    # ---------------------------------------------------------------- waiting
    def wait(self, futures: Sequence[cf.Future], timeout: float | None) -> None:
        """Waits until one of `futures` is done or `timeout` passes; raises if the instance is stopped.

        Each future wakes this instance through a done-callback registered on
        first wait (one lock release), which is far cheaper on the decode
        path than `concurrent.futures.wait`'s per-call waiter objects.
        """
        if self.stopped.done():
            raise InstanceTerminated(self.stopped.result())
        for future in futures:
            if future not in self._watched:
                self._watched.add(future)
                future.add_done_callback(self._wake)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if any(f.done() for f in futures):
                return
            if self.stopped.done():
                raise InstanceTerminated(self.stopped.result())
            if deadline is None:
                self._wakeup.acquire()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._wakeup.acquire(timeout=remaining)

    def _wake(self, _future: Any = None) -> None:
        try:
            self._wakeup.release()
        except RuntimeError:  # already released: a wakeup is pending anyway
            pass

    def stop(self, reason: str) -> None:
        """Asks the instance to stop: wakes any host wait (the epoch callback stops running wasm)."""
        if not self.stopped.done():
            try:
                self.stopped.set_result(reason)
            except cf.InvalidStateError:
                pass
        self._wake()

    # ---------------------------------------------------------------- teardown
    def close(self, drain_seconds: float = 0.0) -> None:
        """Releases everything the instance holds: KV pages, queues, subscriptions, futures.

        With `drain_seconds` (a normal return) the commands the instance
        already queued run first, for up to that long, so its last frees and
        exports are not lost; after an error or a kill they are cancelled.

        Safe to call from any thread and more than once: `Instance.terminate`
        calls it from the terminating side while the instance's own thread
        may still be blocked in a WASI call (which wasmtime cannot
        interrupt), and that thread calls it again when it ends. Only the
        first call drains; every call releases what is left (a later call
        cuts a drain in progress short)."""
        with self._states_lock:
            first = not self._closed
            self._closed = True
            states = list(self._states)
        if first and drain_seconds > 0:
            for model_name in states:
                served = self.host.models.get(model_name)
                if served is not None and not served.core.drain_instance(self.instance_id, drain_seconds):
                    log.warning("instance %s: queued commands still pending after %.0fs; cancelling them",
                                self.instance_id, drain_seconds)
        for kind, obj in self.table.drain():
            release(kind, obj)
        for sub in list(self.subscriptions):
            sub.close()
        self.subscriptions.clear()
        for model_name in states:
            served = self.host.models.get(model_name)
            if served is not None:
                try:
                    self.kv_pages_peak = max(self.kv_pages_peak, served.core.instance_pages(self.instance_id)[1])
                except PieError:  # closed already (by the other thread releasing it)
                    pass
                try:
                    served.core.close_instance(self.instance_id)
                except Exception:  # noqa: BLE001 - teardown must go on for the other models
                    log.exception("closing instance %s on %s failed", self.instance_id, model_name)


_current = threading.local()


def bind_context(ctx: InstanceContext | None) -> None:
    """Makes `ctx` the instance whose host calls this thread serves."""
    _current.ctx = ctx


def bound_context() -> InstanceContext | None:
    """The instance this thread serves, if any."""
    return getattr(_current, "ctx", None)


def current_context() -> InstanceContext:
    """The instance this thread serves; a trap outside an instance thread."""
    ctx = getattr(_current, "ctx", None)
    if ctx is None:
        raise WasmtimeError("pie host function called outside an instance thread")
    return ctx
