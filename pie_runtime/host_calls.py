"""Host functions whose argument and result conversions are built once, not on every call.

wasmtime-py's own trampoline for a host function (`wasmtime.component`'s
`func_impl`) rebuilds the Python view of the function's parameter and result
types from the C API on every call, then walks those types in Python to
convert each value (see `wit_codecs`). For an inferlet that is most of a
host call's cost (tens to hundreds of microseconds; a decode step makes
several calls per sequence). The types of a function never change, so
`add_func` registers a trampoline that compiles converters for them on the
first call and reuses them, and `cache_compound_types` makes wasmtime-py's
compound types keep their children (for the conversions it still does
itself: the guest's exports).

This leans on wasmtime-py internals (its function slab and ctypes bindings),
pinned to the `wasmtime` version range in pyproject; tests/runtime exercise
every bound function through it.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import LinkerInstance
from wasmtime.component import _types
from wasmtime.component._enter import catch_exceptions
from wasmtime.component._linker import FUNCTIONS, func_finalize
from wasmtime.component._types import FuncType

from pie_runtime import wit_codecs

_VAL_SIZE = ctypes.sizeof(wit_codecs.Val)
# Function handle -> (parameter lifters, result lowerer or None). Handles are
# never reused by wasmtime-py's slab, so an entry never goes stale.
_CODECS: dict[int, tuple[list[wit_codecs.Lift], wit_codecs.Lower | None]] = {}


def _codecs(key: int, ty_raw: Any, store: Any) -> tuple[list[wit_codecs.Lift], wit_codecs.Lower | None]:
    fty = FuncType._from_ptr(ty_raw, owner=store)
    result = fty.result
    codecs = ([wit_codecs.lifter(ty) for _, ty in fty.params],
              wit_codecs.lowerer(result) if result is not None else None)
    return _CODECS.setdefault(key, codecs)


@ffi.wasmtime_component_func_callback_t
def _trampoline(idx, context, ty_raw, args, nargs, results, nresults):  # type: ignore[no-untyped-def]
    def run(store: Any) -> None:
        key = idx or 0
        codecs = _CODECS.get(key)
        if codecs is None:
            codecs = _codecs(key, ty_raw, store)
        lifts, lower = codecs
        base = ctypes.addressof(args.contents) if lifts else 0
        values = [lift(base + i * _VAL_SIZE) for i, lift in enumerate(lifts)]
        result = FUNCTIONS.get(key)(store, *values)
        if lower is not None:
            lower(store, result, results[0])

    return catch_exceptions(context, run)


def add_func(instance: LinkerInstance, name: str, func: Callable[..., Any]) -> None:
    """`LinkerInstance.add_func` with the compiled-conversion trampoline."""
    encoded = name.encode("utf-8")
    idx = FUNCTIONS.allocate(func)
    err = ffi.wasmtime_component_linker_instance_add_func(
        instance.ptr(), ctypes.create_string_buffer(encoded), len(encoded), _trampoline, idx, func_finalize)
    if err:
        raise WasmtimeError._from_ptr(err)


# (class, property) pairs whose value is a child type read from C on each access.
_CHILD_TYPE_PROPERTIES = (
    ("ListType", "element"), ("RecordType", "fields"), ("TupleType", "elements"),
    ("VariantType", "cases"), ("EnumType", "names"), ("FlagsType", "names"),
    ("OptionType", "payload"), ("ResultType", "ok"), ("ResultType", "err"),
)


def cache_compound_types() -> None:
    """Makes compound component types remember their child types.

    Each type object owns an immutable copy of its C type, so caching what
    its properties return is safe; only the repeated C round trips go."""
    for class_name, prop in _CHILD_TYPE_PROPERTIES:
        cls = getattr(_types, class_name, None)
        original = getattr(cls, prop, None) if cls is not None else None
        if not isinstance(original, property):
            continue  # already cached, or a wasmtime-py that changed shape
        cached = functools.cached_property(original.fget)
        cached.__set_name__(cls, prop)
        setattr(cls, prop, cached)
