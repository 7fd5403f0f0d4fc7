"""The Wasm component host: binds every function of wit/inferlet.wit to Python.

One `Host` per server holds the wasmtime Linker (built once, shared by all
instances: wasmtime lets many stores instantiate through one linker) and the
services behind it: the served models and their serving cores, the broadcast
broker and the key-value store.

Host functions learn which instance is calling from a thread-local: each
instance runs on its own OS thread (see `instance.py`) and wasm only ever
calls back into Python on the thread that entered it.

Resources (pollable, futures, subscription, tokenizer, model, queue,
grammar matcher) live in
a per-instance `ResourceTable`: the guest holds an integer `rep`, the table
maps it to the Python object. An `own` handle returned to the guest is a new
table entry; its destructor runs when the guest drops the handle. A `borrow`
(the `self` of a method, the handles given to `poll`) is only looked up.

Failure rules:
- An expected failure (`PieError` from the serving core, bad arguments found
  here) becomes the WIT `error` record for functions returning `result`.
- In a function without a `result`, or on a host bug, the call traps with a
  clear message: the instance ends, the server goes on.
- Host functions never let a plain Python exception escape into wasmtime-py:
  it would be parked in a process-global slot and could resurface in another
  instance's thread. They raise `WasmtimeError` (a trap) instead.
"""

from __future__ import annotations

import concurrent.futures as cf
import enum
import logging
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import wasmtime
from wasmtime import WasmtimeError
from wasmtime.component import Linker, Record, ResourceType

from engine_jax.batch import Distribution, EngineInputError, Logprobs, Sample
from pie_runtime import component_cache, grammar, host_calls, wit_codecs
from pie_runtime.errors import PieError
from pie_runtime.guest_output import LineSink, OutputBudget
from pie_runtime.kvstore import KVStore, NamespacedKV
from pie_runtime.limits import TenantLimits
from pie_runtime.policies import DEFAULT_DECODE_RUN
from pie_runtime.messaging import Broker, ClientChannel, Subscription

log = logging.getLogger("pie_runtime.host")

WIT_PACKAGE = "pie:inferlet"
WIT_VERSION = "0.2.0"
SERVER_VERSION = "0.1.0"


def _iface(name: str) -> str:
    return f"{WIT_PACKAGE}/{name}@{WIT_VERSION}"


# The interface every inferlet exports.
RUN_INTERFACE = _iface("run")


class Kind(enum.IntEnum):
    """Host resource types; the value is wasmtime's host resource type id."""

    POLLABLE = 1
    FUTURE_UNIT = 2
    FUTURE_STRING = 3
    SUBSCRIPTION = 4
    TOKENIZER = 5
    MODEL = 6
    QUEUE = 7
    FORWARD_FUTURE = 8
    MATCHER = 9


# --------------------------------------------------------------------------- capabilities


NETWORK_REFUSED = (
    "network access cannot be granted: wasmtime-py 50's WASI configuration can only hand a guest the "
    "host's whole network (wasi_config_inherit_network), with no way to limit it to listed host:port "
    "pairs, so pie-run refuses rather than grant more than was asked")


@dataclass(frozen=True)
class Capabilities:
    """Outside access an instance gets: what the operator allows, met with what the inferlet declares.

    - `fs`: host directories preopened read-only, at the same path inside
      the guest (operator: `fs:DIR`); `fs_rw`: read and write (`fs-rw:DIR`).
      An inferlet declaring "filesystem" gets them all; no other path exists
      for it.
    - `launch`: `runtime.launch` (operator: `launch`); children run on this
      server under the launch tree's limits (`pie_runtime.limits`).
    - Network: never. See `NETWORK_REFUSED`.
    """

    fs: tuple[str, ...] = ()
    fs_rw: tuple[str, ...] = ()
    launch: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> "Capabilities":
        """Parses the operator's `--allow` value, e.g. ``fs:/data,fs-rw:/scratch,launch``."""
        read_only, read_write, launch = [], [], False
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            kind, _, path = item.partition(":")
            if kind == "launch" and not path:
                launch = True
            elif kind in ("net", "network"):
                raise ValueError(f"--allow {item}: {NETWORK_REFUSED}")
            elif kind in ("fs", "fs-rw") and path:
                directory = Path(path).expanduser().resolve()
                if not directory.is_dir():
                    raise ValueError(f"--allow {item}: {directory} is not a directory")
                (read_write if kind == "fs-rw" else read_only).append(str(directory))
            else:
                raise ValueError(f"unknown capability {item!r}; expected 'fs:DIR' (read-only), "
                                 "'fs-rw:DIR' (read and write) or 'launch'")
        read_only = [d for d in read_only if d not in read_write]
        return cls(fs=tuple(dict.fromkeys(read_only)), fs_rw=tuple(dict.fromkeys(read_write)), launch=launch)

    def grant(self, declared: Iterable[str]) -> "Capabilities":
        """What an inferlet declaring `declared` actually gets: never more than either side."""
        # Manifests name them "filesystem"/"launch" (inferlet_toolchain.manifest).
        aliases = {"filesystem": "fs"}
        kinds = {aliases.get(k, k) for k in (str(d).split(":", 1)[0].strip() for d in declared)}
        files = "fs" in kinds
        return Capabilities(fs=self.fs if files else (), fs_rw=self.fs_rw if files else (),
                            launch=self.launch and "launch" in kinds)

    def describe(self) -> str:
        parts = ([f"fs:{d}" for d in self.fs] + [f"fs-rw:{d}" for d in self.fs_rw]
                 + (["launch"] if self.launch else []))
        return ",".join(parts) or "none"


# --------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    """A model this server serves: the engine (tokenizer, config) and the serving core that batches it."""

    name: str
    engine: Any  # engine_jax.engine.Engine
    core: Any  # pie_runtime.serving.ServingCore
    # runtime.scheduling's queue-ahead hint; None = on when the engine runs on an accelerator.
    queue_ahead: bool | None = None

    # runtime.scheduling's decode-run hint: tokens per `forward` call; None = DEFAULT_DECODE_RUN.
    decode_run: int | None = None

    @property
    def decodes_one_ahead(self) -> bool:
        if self.queue_ahead is not None:
            return self.queue_ahead
        return self.engine.platform != "cpu"

    @property
    def decode_run_length(self) -> int:
        return DEFAULT_DECODE_RUN if self.decode_run is None else self.decode_run

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.engine.config.vocab_size)

    @property
    def page_size(self) -> int:
        return int(self.engine.page_size)


@dataclass(frozen=True)
class Program:
    """A component instances may launch (`runtime.launch`), with what it declared.

    `manifest` is duck-typed (inferlet_toolchain.manifest.Manifest: `parse_cli`)
    so this layer does not import the toolchain; None for a component built
    without one (its arguments pass through unchecked)."""

    name: str
    component: Any  # wasmtime.component.Component
    manifest: Any | None = None
    grant: Capabilities = Capabilities()

    def check_arguments(self, arguments: Sequence[str]) -> list[str]:
        """The canonical argument list, or `invalid-argument` with the manifest's reason."""
        if self.manifest is None:
            return list(arguments)
        try:
            return list(self.manifest.parse_cli(list(arguments)))
        except Exception as e:  # ArgumentError, or HelpRequested whose message is the usage text
            raise PieError.invalid(f"arguments for {self.name!r}: {e}") from None


# --------------------------------------------------------------------------- resources


@dataclass
class HostFuture:
    """A future resource. `cancel_on_drop` is set for message futures so a dropped
    receive does not swallow the next message; command futures (forward,
    synchronize) are never cancelled: the command takes effect regardless."""

    future: cf.Future
    cancel_on_drop: bool = False
    # Turns the core's result into the WIT value (forward outputs).
    convert: Callable[[Any], Any] | None = None


@dataclass
class ModelHandle:
    served: ServedModel


class ResourceTable:
    """rep -> (kind, object) for one instance. Reps are never reused within an instance."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[Kind, Any]] = {}
        self._next = 1

    def insert(self, kind: Kind, obj: Any) -> int:
        rep = self._next
        self._next += 1
        self._items[rep] = (kind, obj)
        return rep

    def get(self, kind: Kind, rep: int) -> Any:
        item = self._items.get(rep)
        if item is None or item[0] != kind:
            raise WasmtimeError(f"invalid {kind.name.lower()} handle {rep}")
        return item[1]

    def pop(self, rep: int) -> tuple[Kind, Any] | None:
        return self._items.pop(rep, None)

    def drain(self) -> list[tuple[Kind, Any]]:
        items, self._items = list(self._items.values()), {}
        return items

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------- per-instance state


class InstanceTerminated(Exception):
    """Raised inside a host wait when the instance has been told to stop."""


class InstanceContext:
    """Everything the host functions need about one running instance."""

    def __init__(
        self,
        host: "Host",
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
            _on_drop(kind, obj)
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


def _on_drop(kind: Kind, obj: Any) -> None:
    if kind in (Kind.FUTURE_UNIT, Kind.FUTURE_STRING, Kind.FORWARD_FUTURE):
        if obj.cancel_on_drop:
            obj.future.cancel()
    elif kind == Kind.SUBSCRIPTION:
        obj.close()
    elif kind == Kind.QUEUE:
        # No new commands; those already queued still run (a dropped queue
        # must not lose its frees and exports).
        obj.queue.close()


_current = threading.local()


def bind_context(ctx: InstanceContext | None) -> None:
    """Makes `ctx` the instance whose host calls this thread serves."""
    _current.ctx = ctx


def _context() -> InstanceContext:
    ctx = getattr(_current, "ctx", None)
    if ctx is None:
        raise WasmtimeError("pie host function called outside an instance thread")
    return ctx


# --------------------------------------------------------------------------- value conversion


def error_record(code: str, message: str) -> Record:
    rec = Record()
    setattr(rec, "code", code)
    setattr(rec, "message", message)
    return rec


def decode_brle(runs: Sequence[int], length: int, what: str) -> np.ndarray:
    """A WIT BRLE (alternating runs, starting with `false`) as a bool array of `length`."""
    r = np.asarray(runs, dtype=np.int64)
    total = int(r.sum()) if r.size else 0
    if total != length:
        raise PieError.invalid(f"{what}: BRLE runs sum to {total}, expected {length}")
    values = np.zeros(r.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, r)


def encode_brle(mask: Sequence[bool] | np.ndarray) -> list[int]:
    """The inverse of `decode_brle` (used by tests and tools)."""
    runs, current, count = [], False, 0
    for bit in np.asarray(mask, dtype=bool).tolist():
        if bit == current:
            count += 1
        else:
            runs.append(count)
            current, count = bit, 1
    runs.append(count)
    return runs


def _sample(spec: Any, vocab_size: int) -> Sample:
    allowed = spec.allowed
    allowed_mask = None if allowed is None else decode_brle(allowed, vocab_size, "sample.allowed")
    return Sample(
        index=spec.index,
        temperature=float(spec.temperature),
        top_k=getattr(spec, "top-k"),
        top_p=float(getattr(spec, "top-p")),
        min_p=float(getattr(spec, "min-p")),
        seed=spec.seed,
        allowed=allowed_mask,
    )


def _output_request(req: Any, vocab_size: int) -> Any:
    tag, spec = req.tag, req.payload
    if tag == "sample":
        return _sample(spec, vocab_size)
    if tag == "distribution":
        return Distribution(index=spec.index, k=spec.k, temperature=float(spec.temperature))
    if tag == "logprobs":
        return Logprobs(index=spec.index, token_ids=tuple(spec.tokens))
    raise PieError.invalid(f"unknown output request {tag!r}")


def _output_value(request: Any, result: Any) -> Any:
    """One core result as the WIT `output` variant (untagged in wasmtime-py: int / tuple / list)."""
    if isinstance(request, Sample):
        return int(result)
    if isinstance(request, Distribution):
        ids, probs = result
        return ([int(i) for i in ids], [float(p) for p in probs])
    return [float(p) for p in result]


# --------------------------------------------------------------------------- the host


GuestOutput = Callable[[str, str, str], None]  # (instance id, "stdout" | "stderr", text)


def stderr_guest_output(instance_id: str, stream: str, text: str) -> None:
    """Default sink for a guest's stdout/stderr: our stderr, one prefixed line each."""
    sys.stderr.write(f"[{instance_id[:8]} {stream}] {text}\n")
    sys.stderr.flush()


class Host:
    """The server side of the contract: models, messaging, key-value store and the linker binding them."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        broker: Broker | None = None,
        kvstore: KVStore | None = None,
        guest_output: GuestOutput = stderr_guest_output,
        wasm_engine: wasmtime.Engine | None = None,
        version: str = SERVER_VERSION,
        limits: TenantLimits | None = None,
    ) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.limits = limits if limits is not None else TenantLimits()
        self.broker = broker if broker is not None else Broker()
        self.kvstore = kvstore if kvstore is not None else KVStore(self.limits)
        self.guest_output = guest_output
        self.wasm_engine = wasm_engine if wasm_engine is not None else component_cache.shared_engine()
        self.version = version
        self.linker = build_linker(self.wasm_engine)
        # Programs instances may launch by name (pie-run --program NAME=PATH).
        self.programs: dict[str, Program] = {}
        self._live: set[str] = set()  # instances admitted whose thread has not ended
        self._live_lock = threading.Lock()

    def admit(self, instance_id: str) -> None:
        """Counts a starting instance; out-of-memory past `max_instances`."""
        with self._live_lock:
            if len(self._live) >= self.limits.max_instances:
                raise PieError.out_of_memory(
                    f"the server already runs {len(self._live)} instances, the most allowed (max_instances)")
            self._live.add(instance_id)

    def retire(self, instance_id: str) -> None:
        with self._live_lock:
            self._live.discard(instance_id)

    def live_instances(self) -> int:
        """Instances started whose thread has not ended yet (terminated ones
        still blocked in a WASI call included)."""
        with self._live_lock:
            return len(self._live)

    def register_program(self, program: Program) -> None:
        if not program.name:
            raise ValueError("a registered program needs a name ('' means the caller's own program)")
        self.programs[program.name] = program

    def program(self, name: str) -> Program:
        found = self.programs.get(name)
        if found is None:
            raise PieError.not_found(f"no program {name!r} is registered with this server; "
                                     f"registered: {sorted(self.programs)}")
        return found

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise PieError.not_found(f"no model {name!r}; this server serves {sorted(self.models)}")
        return served


# --------------------------------------------------------------------------- host functions
#
# Each function takes (ctx, store, *wit_args). `_bind` wraps it with the
# error policy described in the module docstring.


def _own(ctx: InstanceContext, kind: Kind, obj: Any) -> wit_codecs.NewHandle:
    return wit_codecs.NewHandle(ctx.table.insert(kind, obj), int(kind))


def _rep(store: Any, handle: Any) -> int:
    """The table key of a handle the guest passed in (lifted by `wit_codecs`)."""
    if isinstance(handle, wit_codecs.Handle):
        return handle.rep(store)
    return handle.to_host(store).rep


def _borrowed(ctx: InstanceContext, store: Any, handle: Any, kind: Kind) -> Any:
    return ctx.table.get(kind, _rep(store, handle))


def _future_result(ctx: InstanceContext, hf: HostFuture) -> Any:
    """Blocks on a future resource; its value, or `PieError` for the guest."""
    ctx.wait([hf.future], None)
    fut = hf.future
    if fut.cancelled():
        raise PieError.closed("the future was cancelled")
    exc = fut.exception()
    if exc is not None:
        if isinstance(exc, PieError):
            raise exc
        raise PieError.internal(f"{type(exc).__name__}: {exc}")
    value = fut.result()
    return hf.convert(value) if hf.convert is not None else value


# ---- types
def _pollable_ready(ctx, store, this):
    return bool(_borrowed(ctx, store, this, Kind.POLLABLE).done())


def _pollable_of(kind: Kind):
    def pollable(ctx, store, this):
        hf: HostFuture = _borrowed(ctx, store, this, kind)
        return _own(ctx, Kind.POLLABLE, hf.future)
    return pollable


def _future_unit_get(ctx, store, this):
    _future_result(ctx, _borrowed(ctx, store, this, Kind.FUTURE_UNIT))
    return None


def _future_string_get(ctx, store, this):
    return str(_future_result(ctx, _borrowed(ctx, store, this, Kind.FUTURE_STRING)))


# ---- runtime
def _runtime_version(ctx, store):
    return ctx.host.version


def _runtime_instance_id(ctx, store):
    return ctx.instance_id


def _runtime_arguments(ctx, store):
    return list(ctx.arguments)


def _runtime_models(ctx, store):
    return sorted(ctx.host.models)


def _pollable_futures(ctx: InstanceContext, store: Any, handles: Sequence[Any]) -> list[cf.Future]:
    # `poll` takes owned handles: wasmtime 50's C API cannot lift a
    # list<borrow<T>> into a host function ("BUG: deferred host scope").
    futures = []
    for h in handles:
        rep = _rep(store, h)
        futures.append(ctx.table.get(Kind.POLLABLE, rep))
        # The guest gave the handle away: it is ours to forget (no destructor call comes).
        ctx.table.pop(rep)
    return futures


def _runtime_launch(ctx, store, program, arguments):
    if ctx.launcher is None:
        raise PieError.unsupported("this instance cannot launch children")
    return _own(ctx, Kind.FUTURE_STRING, HostFuture(ctx.launcher(program, list(arguments))))


def _runtime_scheduling(ctx, store, model):
    served = _borrowed(ctx, store, model, Kind.MODEL).served
    hints = Record()
    setattr(hints, "decode-run", served.decode_run_length)
    setattr(hints, "queue-ahead", served.decodes_one_ahead)
    return hints


def _runtime_poll(ctx, store, handles, timeout_ms):
    futures = _pollable_futures(ctx, store, handles)
    timeout = None if timeout_ms is None else timeout_ms / 1000.0
    if not futures:
        # Nothing to wait for: with a timeout this is a sleep, without one it
        # would block forever, so it returns at once.
        if timeout:
            ctx.wait([], timeout)
        return []
    if not any(f.done() for f in futures) and timeout != 0:
        ctx.wait(futures, timeout)
    return [i for i, f in enumerate(futures) if f.done()]


# ---- messaging
# Bounds on what one call may hand the host (as the key-value store bounds its entries).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_TOPIC_BYTES = 4096


def _check_size(what: str, text: str, limit: int) -> None:
    if len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
        raise PieError.invalid(f"{what} is longer than {limit} bytes")


def _messaging_send(ctx, store, message):
    _check_size("message", message, MAX_MESSAGE_BYTES)
    ctx.client.send(message)


def _messaging_receive(ctx, store):
    return _own(ctx, Kind.FUTURE_STRING, HostFuture(ctx.client.receive(), cancel_on_drop=True))


def _messaging_broadcast(ctx, store, topic, message):
    _check_size("topic", topic, MAX_TOPIC_BYTES)
    _check_size("message", message, MAX_MESSAGE_BYTES)
    ctx.host.broker.broadcast(topic, message, ctx.namespace)


def _messaging_subscribe(ctx, store, topic):
    _check_size("topic", topic, MAX_TOPIC_BYTES)
    sub = ctx.host.broker.subscribe(topic, ctx.namespace)
    ctx.subscriptions.add(sub)
    return _own(ctx, Kind.SUBSCRIPTION, sub)


def _subscription_next(ctx, store, this):
    sub: Subscription = _borrowed(ctx, store, this, Kind.SUBSCRIPTION)
    return _own(ctx, Kind.FUTURE_STRING, HostFuture(sub.next(), cancel_on_drop=True))


# ---- kvstore
def _kv_get(ctx, store, key):
    return ctx.kv.get(key)


def _kv_set(ctx, store, key, value):
    ctx.kv.set(key, value)


def _kv_delete(ctx, store, key):
    return ctx.kv.delete(key)


def _kv_list_keys(ctx, store, prefix):
    return ctx.kv.list_keys(prefix)


# ---- model
def _tokenizer_encode(ctx, store, this, text):
    served: ServedModel = _borrowed(ctx, store, this, Kind.TOKENIZER)
    return [int(t) for t in served.tokenizer.encode(text, add_special_tokens=False)]


def _tokenizer_decode(ctx, store, this, tokens):
    served: ServedModel = _borrowed(ctx, store, this, Kind.TOKENIZER)
    vocab = _tokenizer_vocab_size(served)
    for t in tokens:
        if not 0 <= t < vocab:
            raise PieError.invalid(f"token id {t} is outside the vocabulary [0, {vocab})")
    return served.tokenizer.decode(list(tokens))


def _tokenizer_vocab_size(served: ServedModel) -> int:
    return int(served.tokenizer.vocab_size)


def _tokenizer_vocabulary(ctx, store, this):
    served: ServedModel = _borrowed(ctx, store, this, Kind.TOKENIZER)
    return [bytes(b) for b in served.tokenizer.vocabulary()]


def _tokenizer_special_tokens(ctx, store, this):
    served: ServedModel = _borrowed(ctx, store, this, Kind.TOKENIZER)
    return [(str(text), int(i)) for text, i in sorted(served.tokenizer.special_tokens().items(),
                                                       key=lambda kv: kv[1])]


def _model_open(ctx, store, name):
    return _own(ctx, Kind.MODEL, ModelHandle(ctx.host.model(name)))


def _model_info(ctx, store, this):
    served = _borrowed(ctx, store, this, Kind.MODEL).served
    cfg = served.engine.config
    tok = served.tokenizer
    # The tokenizer's view first (it reads tokenizer_config.json); the model
    # config's as a fallback for checkpoints that only declare them there.
    eos = list(tok.eos_token_ids) or list(cfg.eos_token_ids)
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    info = Record()
    for name, value in (
        ("name", served.name),
        ("architecture", str(cfg.architecture)),
        ("vocab-size", int(cfg.vocab_size)),
        ("page-size", served.page_size),
        ("max-positions", int(cfg.max_position_embeddings)),
        ("eos-tokens", [int(t) for t in eos]),
        ("bos-token", None if bos is None else int(bos)),
        ("chat-template", tok.chat_template or ""),
    ):
        setattr(info, name, value)
    return info


def _model_tokenizer(ctx, store, this):
    served = _borrowed(ctx, store, this, Kind.MODEL).served
    return _own(ctx, Kind.TOKENIZER, served)


def _model_apply_chat_template(ctx, store, this, messages, add_generation_prompt):
    served = _borrowed(ctx, store, this, Kind.MODEL).served
    if not served.tokenizer.chat_template:
        raise PieError.unsupported(f"model {served.name!r} has no chat template")
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    try:
        return str(served.tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt))
    except Exception as e:  # jinja2 template errors, raise_exception() inside templates
        raise PieError.invalid(f"chat template failed: {e}") from None


def _model_create_queue(ctx, store, this, priority):
    served = _borrowed(ctx, store, this, Kind.MODEL).served
    queue = ctx.state_for(served).create_queue(priority)
    return _own(ctx, Kind.QUEUE, _QueueHandle(served, queue))


# ---- inference
@dataclass
class _QueueHandle:
    served: ServedModel
    queue: Any  # serving core Queue


def _queue(ctx, store, this) -> _QueueHandle:
    return _borrowed(ctx, store, this, Kind.QUEUE)


def _queue_set_priority(ctx, store, this, priority):
    _queue(ctx, store, this).queue.set_priority(priority)


def _queue_synchronize(ctx, store, this):
    return _own(ctx, Kind.FUTURE_UNIT, HostFuture(_queue(ctx, store, this).queue.synchronize()))


def _queue_allocate_pages(ctx, store, this, count):
    return [int(p) for p in _queue(ctx, store, this).queue.allocate_pages(count)]


def _queue_free_pages(ctx, store, this, pages):
    _queue(ctx, store, this).queue.free_pages(list(pages))


def _queue_copy_slots(ctx, store, this, src, src_offset, dst, dst_offset, count):
    _queue(ctx, store, this).queue.copy_slots(src, src_offset, dst, dst_offset, count)


def _queue_mask_slots(ctx, store, this, page, offset, count, masked):
    _queue(ctx, store, this).queue.mask_slots(page, offset, count, masked)


def _queue_export_pages(ctx, store, this, name, pages, last_page_len, persistent):
    _queue(ctx, store, this).queue.export_pages(name, list(pages), last_page_len, persistent)


def _queue_unexport(ctx, store, this, name):
    _queue(ctx, store, this).queue.unexport(name)


def _queue_import_pages(ctx, store, this, name):
    ids, last_page_len = _queue(ctx, store, this).queue.import_pages(name)
    return ([int(i) for i in ids], int(last_page_len))


def _queue_list_exports(ctx, store, this):
    return [str(n) for n in _queue(ctx, store, this).queue.list_exports()]


def _forward_args(served: ServedModel, request: Any) -> tuple[Any, ...]:
    """A WIT forward-request as `Queue.forward` arguments (tokens, positions,
    pages, last-page-len, mask, outputs); token ids are checked by the
    engine's validation in the queue."""
    tokens = request.tokens
    pages = request.pages
    last_page_len = getattr(request, "last-page-len")
    mask = None
    if request.mask is not None:
        if len(request.mask) != len(tokens):
            raise PieError.invalid(f"mask has {len(request.mask)} rows for {len(tokens)} tokens")
        if not pages:
            raise PieError.invalid("a mask needs at least one page")
        seq_len = (len(pages) - 1) * served.page_size + last_page_len
        if len(tokens):
            mask = np.stack([decode_brle(row, seq_len, f"mask row {i}") for i, row in enumerate(request.mask)])
        else:
            mask = np.zeros((0, seq_len), dtype=bool)
    outputs = [_output_request(o, served.vocab_size) for o in request.outputs]
    return tokens, request.positions, pages, last_page_len, mask, outputs


def _outputs_converter(outputs: Sequence[Any]) -> Callable[[Sequence[Any]], list[Any]]:
    def convert(results: Sequence[Any]) -> list[Any]:
        if len(results) != len(outputs):
            raise PieError.internal(f"engine returned {len(results)} outputs for {len(outputs)} requests")
        return [_output_value(req, res) for req, res in zip(outputs, results)]

    return convert


def _queue_forward(ctx, store, this, request, options):
    """Enqueues one pass, or a decode run when `options.draws` is not empty."""
    handle = _queue(ctx, store, this)
    served = handle.served
    tokens, positions, pages, last_page_len, mask, outputs = _forward_args(served, request)
    feed_previous = bool(getattr(options, "feed-previous"))
    draws = [_sample(d, served.vocab_size) for d in options.draws]
    if draws:
        if mask is not None:
            raise PieError.invalid("a decode run attends causally: a request with draws takes no mask")
        future = handle.queue.forward_run(tokens, positions, pages, last_page_len, outputs, draws,
                                          feeds_previous=feed_previous)
    else:
        future = handle.queue.forward(tokens, positions, pages, last_page_len, mask, outputs,
                                      feeds_previous=feed_previous)
    return _own(ctx, Kind.FORWARD_FUTURE, HostFuture(future, convert=_outputs_converter(outputs + draws)))


def _forward_future_get(ctx, store, this):
    return _future_result(ctx, _borrowed(ctx, store, this, Kind.FORWARD_FUTURE))


# --------------------------------------------------------------------------- binding


def _bind(fn: Callable[..., Any], returns_result: bool, name: str) -> Callable[..., Any]:
    """Wraps a host function with the context lookup and the error policy."""

    def call(store: Any, *args: Any) -> Any:
        ctx = _context()
        ctx.host_calls += 1
        if ctx.first_call_at is None:
            ctx.first_call_at = time.perf_counter()
        try:
            if ctx.stopped.done():  # terminated (and maybe released already): no more host work
                raise InstanceTerminated(ctx.stopped.result())
            return fn(ctx, store, *args)
        except PieError as e:
            if returns_result:
                return error_record(e.code, e.message)
            trap = f"{name}: {e.code}: {e.message}"
        except EngineInputError as e:
            if returns_result:
                return error_record("invalid-argument", str(e))
            trap = f"{name}: invalid-argument: {e}"
        except InstanceTerminated as e:
            trap = f"instance stopped: {e}"
        except WasmtimeError as e:
            trap = str(e)
        except Exception as e:  # noqa: BLE001 - a host bug must not take the server down
            log.error("host function %s failed:\n%s", name, traceback.format_exc())
            if returns_result:
                return error_record("internal", f"{name}: {type(e).__name__}: {e}")
            trap = f"{name}: internal error: {type(e).__name__}: {e}"
        ctx.host_trap = trap
        raise WasmtimeError(trap)

    return call


def _dtor(store: Any, rep: int) -> None:
    ctx = getattr(_current, "ctx", None)
    if ctx is None:
        return
    item = ctx.table.pop(rep)
    if item is not None:
        try:
            _on_drop(*item)
        except Exception:  # noqa: BLE001 - a destructor must not trap the guest
            log.exception("dropping %s failed", item[0].name)


# interface -> (resources defined there, [(wit name, function, returns result)])
_BINDINGS: dict[str, tuple[tuple[tuple[str, Kind], ...], tuple[tuple[str, Callable[..., Any], bool], ...]]] = {
    "types": (
        (("pollable", Kind.POLLABLE), ("future-unit", Kind.FUTURE_UNIT), ("future-string", Kind.FUTURE_STRING)),
        (
            ("[method]pollable.ready", _pollable_ready, False),
            ("[method]future-unit.pollable", _pollable_of(Kind.FUTURE_UNIT), False),
            ("[method]future-unit.get", _future_unit_get, True),
            ("[method]future-string.pollable", _pollable_of(Kind.FUTURE_STRING), False),
            ("[method]future-string.get", _future_string_get, True),
        ),
    ),
    "runtime": (
        (),
        (
            ("version", _runtime_version, False),
            ("instance-id", _runtime_instance_id, False),
            ("arguments", _runtime_arguments, False),
            ("models", _runtime_models, False),
            ("poll", _runtime_poll, False),
            ("launch", _runtime_launch, True),
            ("scheduling", _runtime_scheduling, False),
        ),
    ),
    "messaging": (
        (("subscription", Kind.SUBSCRIPTION),),
        (
            ("send", _messaging_send, True),
            ("receive", _messaging_receive, False),
            ("broadcast", _messaging_broadcast, True),
            ("subscribe", _messaging_subscribe, True),
            ("[method]subscription.next", _subscription_next, False),
        ),
    ),
    "kvstore": (
        (),
        (
            ("get", _kv_get, False),
            ("set", _kv_set, True),
            ("delete", _kv_delete, False),
            ("list-keys", _kv_list_keys, False),
        ),
    ),
    "inference": (
        (("forward-future", Kind.FORWARD_FUTURE), ("queue", Kind.QUEUE)),
        (
            ("[method]forward-future.pollable", _pollable_of(Kind.FORWARD_FUTURE), False),
            ("[method]forward-future.get", _forward_future_get, True),
            ("[method]queue.set-priority", _queue_set_priority, False),
            ("[method]queue.synchronize", _queue_synchronize, False),
            ("[method]queue.allocate-pages", _queue_allocate_pages, True),
            ("[method]queue.free-pages", _queue_free_pages, True),
            ("[method]queue.copy-slots", _queue_copy_slots, True),
            ("[method]queue.mask-slots", _queue_mask_slots, True),
            ("[method]queue.export-pages", _queue_export_pages, True),
            ("[method]queue.unexport", _queue_unexport, True),
            ("[method]queue.import-pages", _queue_import_pages, True),
            ("[method]queue.list-exports", _queue_list_exports, False),
            ("[method]queue.forward", _queue_forward, True),
        ),
    ),
    "model": (
        (("tokenizer", Kind.TOKENIZER), ("model", Kind.MODEL)),
        (
            ("[method]tokenizer.encode", _tokenizer_encode, False),
            ("[method]tokenizer.decode", _tokenizer_decode, True),
            ("[method]tokenizer.vocabulary", _tokenizer_vocabulary, False),
            ("[method]tokenizer.special-tokens", _tokenizer_special_tokens, False),
            ("[static]model.open", _model_open, True),
            ("[method]model.info", _model_info, False),
            ("[method]model.tokenizer", _model_tokenizer, False),
            ("[method]model.apply-chat-template", _model_apply_chat_template, True),
            ("[method]model.create-queue", _model_create_queue, True),
        ),
    ),
    # Grammar matchers for constrained decoding (pie_runtime/grammar.py).
    "grammar": grammar.host_bindings(_own, _borrowed, Kind.MODEL, Kind.MATCHER),
}


def provided_interfaces() -> list[str]:
    """The `pie:inferlet` interfaces this host implements (a component may import these)."""
    return list(_BINDINGS)


def bound_function_names() -> list[str]:
    """Every `interface#function` this host implements (tests compare it with the WIT)."""
    return [f"{_iface(i)}#{name}" for i, (_, fns) in _BINDINGS.items() for name, _, _ in fns]


def build_linker(engine: wasmtime.Engine) -> Linker:
    """A linker with WASI p2 and every function of the `inferlet` world."""
    host_calls.cache_compound_types()
    linker = Linker(engine)
    linker.add_wasip2()
    with linker.root() as root:
        for iface, (resources, functions) in _BINDINGS.items():
            with root.add_instance(_iface(iface)) as inst:
                for res_name, kind in resources:
                    inst.add_resource(res_name, ResourceType.host(int(kind)), _dtor)
                for name, fn, returns_result in functions:
                    host_calls.add_func(inst, name, _bind(fn, returns_result, name))
    return linker


# --------------------------------------------------------------------------- WASI


def make_wasi(ctx: InstanceContext, grant: Capabilities, program_name: str = "inferlet") -> tuple[wasmtime.WasiConfig, list[LineSink]]:
    """WASI for one instance: no stdin, no env, no network, stdout/stderr to the sink, only granted dirs."""
    wasi = wasmtime.WasiConfig()
    wasi.argv = [program_name, *ctx.arguments]
    sinks = []
    def emit(stream: str, text: str) -> None:
        if stream == "stderr":
            ctx.stderr_tail.append(text)
        ctx.host.guest_output(ctx.instance_id, stream, text)

    limits = ctx.host.limits
    budget = OutputBudget(limits.output_bytes)
    for stream in ("stdout", "stderr"):
        sink = LineSink(lambda text, s=stream: emit(s, text), budget, limits.output_line_bytes)
        sinks.append(sink)
        setattr(wasi, f"{stream}_custom", sink.write)
    for directory in grant.fs:
        wasi.preopen_dir(directory, directory, fs_mutable=False)
    for directory in grant.fs_rw:
        wasi.preopen_dir(directory, directory, fs_mutable=True)
    return wasi, sinks
