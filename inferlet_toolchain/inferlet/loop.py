"""An asyncio event loop that waits on host futures through `runtime.poll`.

Inside the Wasm guest there are no sockets or self-pipes, so asyncio's
default loop cannot even be created. This loop implements the part of
`asyncio.AbstractEventLoop` that coroutines, tasks, `gather`, `sleep` and
timeouts use; when nothing is runnable it blocks in one `poll` call over the
pollables of every pending host future, so forks awaiting their forward
passes wait together and the server can batch them.

Pure Python: the poll function is injected (the SDK passes
`runtime.poll`; tests pass a fake), and host futures are duck-typed
(`pollable()` with `ready()`, and `get()`). Each poll round takes fresh
pollables from the pending futures: `poll` consumes the ones it is given.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import time
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

T = TypeVar("T")
PollFn = Callable[[Sequence[Any], Optional[int]], Sequence[int]]


class PollLoop(asyncio.AbstractEventLoop):
    """A single-threaded asyncio loop whose only I/O is host pollables."""

    def __init__(self, poll: PollFn) -> None:
        self._poll = poll
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._timers: list[asyncio.TimerHandle] = []
        self._waiters: list[tuple[Any, asyncio.Future[None]]] = []
        self._running = False
        self._closed = False
        self._stopping = False
        self._error: Optional[BaseException] = None

    # Waiting on the host --------------------------------------------------
    def wait_ready(self, host_future: Any) -> "asyncio.Future[None]":
        """An asyncio future that resolves once `host_future` has resolved."""
        fut: asyncio.Future[None] = self.create_future()
        self._waiters.append((host_future, fut))
        return fut

    def _block(self) -> None:
        """Waits for a host pollable or the next timer, whichever is first."""
        self._waiters = [(p, f) for p, f in self._waiters if not f.done()]
        timeout_ms: Optional[int] = None
        if self._timers:
            delay = max(0.0, self._timers[0].when() - self.time())
            timeout_ms = int(delay * 1000 + 0.999)
        if not self._waiters:
            if timeout_ms is None:
                raise RuntimeError(
                    "deadlock: every task is waiting, but on nothing the host can resolve "
                    "(an asyncio primitive that nobody will ever set?)"
                )
            time.sleep(timeout_ms / 1000)
            return
        # Fresh pollables for every call: `poll` may take them over (owned
        # handles), and the ones it leaves with us are released right after.
        pollables = [host_future.pollable() for host_future, _ in self._waiters]
        try:
            done = set(self._poll(pollables, timeout_ms))
        finally:
            for pollable in pollables:
                _release(pollable)
        still = []
        for i, (host_future, fut) in enumerate(self._waiters):
            if i in done:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((host_future, fut))
        self._waiters = still

    # Running -------------------------------------------------------------
    def run_until_complete(self, future: Awaitable[T]) -> T:  # type: ignore[override]
        problem = None
        if self._running:
            problem = "this event loop is already running (nested run_until_complete)"
        elif asyncio.events._get_running_loop() is not None:
            problem = "another event loop is running in this thread"
        if problem is not None:
            if asyncio.iscoroutine(future):
                future.close()  # it will never run: no "never awaited" warning
            raise RuntimeError(problem)
        task = asyncio.ensure_future(future, loop=self)
        self._running = True
        self._stopping = False
        asyncio.events._set_running_loop(self)
        try:
            while not task.done():
                self._run_once()
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if self._stopping and not task.done():
                    raise RuntimeError("event loop stopped before the future completed")
        finally:
            self._running = False
            asyncio.events._set_running_loop(None)
        return task.result()

    def _run_once(self) -> None:
        now = self.time()
        while self._timers and (self._timers[0].cancelled() or self._timers[0].when() <= now):
            handle = heapq.heappop(self._timers)
            if not handle.cancelled():
                self._ready.append(handle)
        if not self._ready:
            self._block()
            return
        # Run only what is ready now; callbacks scheduled meanwhile wait a turn.
        for _ in range(len(self._ready)):
            handle = self._ready.popleft()
            if not handle.cancelled():
                handle._run()

    def run_forever(self) -> None:
        raise NotImplementedError("inferlets run one main coroutine: use run_until_complete")

    def stop(self) -> None:
        self._stopping = True

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        self._closed = True
        self._ready.clear()
        self._timers.clear()
        self._waiters.clear()

    async def shutdown_asyncgens(self) -> None:
        return None

    async def shutdown_default_executor(self, timeout: Optional[float] = None) -> None:
        return None

    # Scheduling ----------------------------------------------------------
    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, callback: Callable[..., Any], *args: Any, context: Any = None) -> asyncio.Handle:  # type: ignore[override]
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    call_soon_threadsafe = call_soon  # one thread in the guest

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any, context: Any = None) -> asyncio.TimerHandle:  # type: ignore[override]
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any, context: Any = None) -> asyncio.TimerHandle:  # type: ignore[override]
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._timers, handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        # Cancelled timers are skipped when they reach the top of the heap.
        return None

    def create_future(self) -> "asyncio.Future[Any]":
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: Optional[str] = None, context: Any = None) -> "asyncio.Task[Any]":  # type: ignore[override]
        if context is None:
            return asyncio.Task(coro, loop=self, name=name)
        return asyncio.Task(coro, loop=self, name=name, context=context)

    # Errors and debug ----------------------------------------------------
    def get_debug(self) -> bool:
        return False

    def set_debug(self, enabled: bool) -> None:
        return None

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # An exception escaping a plain callback is a bug the user must see;
        # "task exception never retrieved" reports (they carry a "future")
        # are not: the task's awaiter already got the exception.
        exc = context.get("exception")
        if exc is not None and "future" not in context and self._error is None:
            self._error = exc

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def get_exception_handler(self) -> None:
        return None

    def set_exception_handler(self, handler: Any) -> None:
        raise NotImplementedError("the inferlet loop re-raises callback errors instead")

    def get_task_factory(self) -> None:
        return None


def _release(handle: Any) -> None:
    """Drops a host handle now; one the host took over is already gone."""
    release = getattr(handle, "__exit__", None)
    if release is not None:
        try:
            release(None, None, None)
        except Exception:  # noqa: BLE001 - moved into the host: nothing left to drop
            pass


async def wait(future: Any) -> Any:
    """Awaits a host future (anything with `pollable()` and `get()`) and returns `get()`.

    Errors the host reports are raised by `get()` as usual.
    """
    pollable = future.pollable()
    try:
        ready = pollable.ready()
    finally:
        _release(pollable)
    if not ready:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, PollLoop):
            raise RuntimeError(
                "host futures can only be awaited on the inferlet event loop "
                "(make main async, or use inferlet.run_async)"
            )
        await loop.wait_ready(future)
    return future.get()


def run(coro: Awaitable[T], poll: PollFn) -> T:
    """Runs `coro` to completion on a fresh PollLoop."""
    loop = PollLoop(poll)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
