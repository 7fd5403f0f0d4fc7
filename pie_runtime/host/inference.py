"""The `inference` interface: a model's command queues (pages, slots, exports, forward passes) and forward futures.

Every call validates at once and enqueues on the serving core's `Queue`
(`pie_runtime.queues`); a forward returns a future resolving to its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pie_runtime.errors import PieError
from pie_runtime.host.conversions import forward_args, outputs_converter, sample_request
from pie_runtime.host.futures import HostFuture, future_result, pollable_of
from pie_runtime.host.resource_table import Kind, borrowed, own

if TYPE_CHECKING:
    from pie_runtime.host.registry import ServedModel


@dataclass
class QueueHandle:
    """A `queue` resource: the serving core's queue, on the model it was created on."""

    served: ServedModel
    queue: Any  # pie_runtime.queues.Queue


def _queue(ctx, store, this) -> QueueHandle:
    return borrowed(ctx, store, this, Kind.QUEUE)


def _queue_set_priority(ctx, store, this, priority):
    _queue(ctx, store, this).queue.set_priority(priority)


def _queue_synchronize(ctx, store, this):
    return own(ctx, Kind.FUTURE_UNIT, HostFuture(_queue(ctx, store, this).queue.synchronize()))


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


def _queue_forward(ctx, store, this, request, options):
    """Enqueues one pass, or a decode run when `options.draws` is not empty."""
    handle = _queue(ctx, store, this)
    served = handle.served
    tokens, positions, pages, last_page_len, mask, outputs = forward_args(served, request)
    feed_previous = bool(getattr(options, "feed-previous"))
    draws = [sample_request(d, served.vocab_size) for d in options.draws]
    if draws:
        if mask is not None:
            raise PieError.invalid("a decode run attends causally: a request with draws takes no mask")
        future = handle.queue.forward_run(tokens, positions, pages, last_page_len, outputs, draws,
                                          feeds_previous=feed_previous)
    else:
        future = handle.queue.forward(tokens, positions, pages, last_page_len, mask, outputs,
                                      feeds_previous=feed_previous)
    return own(ctx, Kind.FORWARD_FUTURE, HostFuture(future, convert=outputs_converter(outputs + draws)))


def _forward_future_get(ctx, store, this):
    return future_result(ctx, borrowed(ctx, store, this, Kind.FORWARD_FUTURE))


RESOURCES = (("forward-future", Kind.FORWARD_FUTURE), ("queue", Kind.QUEUE))
FUNCTIONS = (
    ("[method]forward-future.pollable", pollable_of(Kind.FORWARD_FUTURE), False),
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
)
