"""The `runtime` interface: the instance's identity and arguments, the served models, `poll`, `launch`, scheduling hints."""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Sequence

from wasmtime.component import Record

from pie_runtime.errors import PieError
from pie_runtime.host.context import InstanceContext
from pie_runtime.host.futures import HostFuture
from pie_runtime.host.resource_table import Kind, borrowed, handle_rep, own


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
        rep = handle_rep(store, h)
        futures.append(ctx.table.get(Kind.POLLABLE, rep))
        # The guest gave the handle away: it is ours to forget (no destructor call comes).
        ctx.table.pop(rep)
    return futures


def _runtime_launch(ctx, store, program, arguments):
    if ctx.launcher is None:
        raise PieError.unsupported("this instance cannot launch children")
    return own(ctx, Kind.FUTURE_STRING, HostFuture(ctx.launcher(program, list(arguments))))


def _runtime_scheduling(ctx, store, model):
    served = borrowed(ctx, store, model, Kind.MODEL).served
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


RESOURCES = ()
FUNCTIONS = (
    ("version", _runtime_version, False),
    ("instance-id", _runtime_instance_id, False),
    ("arguments", _runtime_arguments, False),
    ("models", _runtime_models, False),
    ("poll", _runtime_poll, False),
    ("launch", _runtime_launch, True),
    ("scheduling", _runtime_scheduling, False),
)
