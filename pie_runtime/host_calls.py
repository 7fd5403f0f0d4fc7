"""Host functions whose component types are derived once, not on every call.

wasmtime-py's own trampoline for a host function (`wasmtime.component`'s
`func_impl`) rebuilds the Python view of the function's parameter and result
types from the C API on every call, and each compound type rebuilds its
children every time it converts a value. For an inferlet that is most of a
host call's cost (tens of microseconds; a decode step makes several calls per
sequence). The types of a function never change, so `add_func` registers a
trampoline that derives them on the first call and reuses them, and
`cache_compound_types` makes the compound types keep their children.

This leans on wasmtime-py internals (its function slab and ctypes bindings),
pinned by the `wasmtime` version in pyproject; tests/runtime exercise every
bound function through it.
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

# Function handle -> (parameter types, result type or None). Handles are never
# reused by wasmtime-py's slab, so an entry never goes stale.
_TYPES: dict[int, tuple[list[Any], Any]] = {}


@ffi.wasmtime_component_func_callback_t
def _trampoline(idx, context, ty_raw, args, nargs, results, nresults):  # type: ignore[no-untyped-def]
    def run(store: Any) -> None:
        key = idx or 0
        types = _TYPES.get(key)
        if types is None:
            fty = FuncType._from_ptr(ty_raw, owner=store)
            types = _TYPES.setdefault(key, ([ty for _, ty in fty.params], fty.result))
        params, result_type = types
        values = [ty.convert_from_c(args[i]) for i, ty in enumerate(params)]
        result = FUNCTIONS.get(key)(store, *values)
        if result_type is not None:
            result_type.convert_to_c(store, result, results)

    return catch_exceptions(context, run)


def add_func(instance: LinkerInstance, name: str, func: Callable[..., Any]) -> None:
    """`LinkerInstance.add_func` with the cached-type trampoline."""
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
