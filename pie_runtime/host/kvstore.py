"""The `kvstore` interface: the key-value store of the instance's namespace (`pie_runtime.kvstore`)."""

from __future__ import annotations


def _kv_get(ctx, store, key):
    return ctx.kv.get(key)


def _kv_set(ctx, store, key, value):
    ctx.kv.set(key, value)


def _kv_delete(ctx, store, key):
    return ctx.kv.delete(key)


def _kv_list_keys(ctx, store, prefix):
    return ctx.kv.list_keys(prefix)


RESOURCES = ()
FUNCTIONS = (
    ("get", _kv_get, False),
    ("set", _kv_set, True),
    ("delete", _kv_delete, False),
    ("list-keys", _kv_list_keys, False),
)
