"""The `types` interface: pollables and futures, and the host side of every future resource.

A command's result (a forward pass, a synchronize, a child's result, a
message) comes back to the guest as a future resource wrapping a
`concurrent.futures.Future`; `get` blocks the instance's thread on it, and
`runtime.poll` waits on several at once through their pollables.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any, Callable

from pie_runtime.errors import PieError
from pie_runtime.host.context import InstanceContext
from pie_runtime.host.resource_table import Kind, borrowed, own


@dataclass
class HostFuture:
    """A future resource. `cancel_on_drop` is set for message futures so a dropped
    receive does not swallow the next message; command futures (forward,
    synchronize) are never cancelled: the command takes effect regardless."""

    future: cf.Future
    cancel_on_drop: bool = False
    # Turns the core's result into the WIT value (forward outputs).
    convert: Callable[[Any], Any] | None = None


def future_result(ctx: InstanceContext, hf: HostFuture) -> Any:
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


def pollable_of(kind: Kind) -> Callable[..., Any]:
    """The `pollable` method of a future resource of `kind`."""
    def pollable(ctx, store, this):
        hf: HostFuture = borrowed(ctx, store, this, kind)
        return own(ctx, Kind.POLLABLE, hf.future)
    return pollable


def _pollable_ready(ctx, store, this):
    return bool(borrowed(ctx, store, this, Kind.POLLABLE).done())


def _future_unit_get(ctx, store, this):
    future_result(ctx, borrowed(ctx, store, this, Kind.FUTURE_UNIT))
    return None


def _future_string_get(ctx, store, this):
    return str(future_result(ctx, borrowed(ctx, store, this, Kind.FUTURE_STRING)))


RESOURCES = (("pollable", Kind.POLLABLE), ("future-unit", Kind.FUTURE_UNIT), ("future-string", Kind.FUTURE_STRING))
FUNCTIONS = (
    ("[method]pollable.ready", _pollable_ready, False),
    ("[method]future-unit.pollable", pollable_of(Kind.FUTURE_UNIT), False),
    ("[method]future-unit.get", _future_unit_get, True),
    ("[method]future-string.pollable", pollable_of(Kind.FUTURE_STRING), False),
    ("[method]future-string.get", _future_string_get, True),
)
