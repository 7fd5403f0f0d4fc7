"""The resources an instance holds, keyed by the handles its guest sees.

Resources (pollable, futures, subscription, tokenizer, model, queue,
grammar matcher) live in a per-instance `ResourceTable`: the guest holds an
integer `rep`, the table maps it to the Python object. An `own` handle
returned to the guest is a new table entry; its destructor (`release`) runs
when the guest drops the handle, or when the instance ends. A `borrow` (the
`self` of a method, the handles given to `poll`) is only looked up.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from wasmtime import WasmtimeError

from pie_runtime.host import wit_codecs

if TYPE_CHECKING:
    from pie_runtime.host.context import InstanceContext


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


def release(kind: Kind, obj: Any) -> None:
    """What dropping a resource does: a receive's future is cancelled (so it
    does not swallow the next message), a subscription closed, a queue
    closed; command futures are never cancelled (the command takes effect
    regardless)."""
    if kind in (Kind.FUTURE_UNIT, Kind.FUTURE_STRING, Kind.FORWARD_FUTURE):
        if obj.cancel_on_drop:
            obj.future.cancel()
    elif kind == Kind.SUBSCRIPTION:
        obj.close()
    elif kind == Kind.QUEUE:
        # No new commands; those already queued still run (a dropped queue
        # must not lose its frees and exports).
        obj.queue.close()


def own(ctx: InstanceContext, kind: Kind, obj: Any) -> wit_codecs.NewHandle:
    """A new handle the guest owns, for `obj`."""
    return wit_codecs.NewHandle(ctx.table.insert(kind, obj), int(kind))


def handle_rep(store: Any, handle: Any) -> int:
    """The table key of a handle the guest passed in (lifted by `wit_codecs`)."""
    if isinstance(handle, wit_codecs.Handle):
        return handle.rep(store)
    return handle.to_host(store).rep


def borrowed(ctx: InstanceContext, store: Any, handle: Any, kind: Kind) -> Any:
    """The object behind a handle the guest passed in; traps on a wrong or unknown handle."""
    return ctx.table.get(kind, handle_rep(store, handle))
