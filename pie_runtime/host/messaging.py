"""The `messaging` interface: the instance's client channel and broadcast topics of its namespace."""

from __future__ import annotations

from pie_runtime.errors import PieError
from pie_runtime.host.futures import HostFuture
from pie_runtime.host.resource_table import Kind, borrowed, own
from pie_runtime.messaging import Subscription

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
    return own(ctx, Kind.FUTURE_STRING, HostFuture(ctx.client.receive(), cancel_on_drop=True))


def _messaging_broadcast(ctx, store, topic, message):
    _check_size("topic", topic, MAX_TOPIC_BYTES)
    _check_size("message", message, MAX_MESSAGE_BYTES)
    ctx.host.broker.broadcast(topic, message, ctx.namespace)


def _messaging_subscribe(ctx, store, topic):
    _check_size("topic", topic, MAX_TOPIC_BYTES)
    sub = ctx.host.broker.subscribe(topic, ctx.namespace)
    ctx.subscriptions.add(sub)
    return own(ctx, Kind.SUBSCRIPTION, sub)


def _subscription_next(ctx, store, this):
    sub: Subscription = borrowed(ctx, store, this, Kind.SUBSCRIPTION)
    return own(ctx, Kind.FUTURE_STRING, HostFuture(sub.next(), cancel_on_drop=True))


RESOURCES = (("subscription", Kind.SUBSCRIPTION),)
FUNCTIONS = (
    ("send", _messaging_send, True),
    ("receive", _messaging_receive, False),
    ("broadcast", _messaging_broadcast, True),
    ("subscribe", _messaging_subscribe, True),
    ("[method]subscription.next", _subscription_next, False),
)
