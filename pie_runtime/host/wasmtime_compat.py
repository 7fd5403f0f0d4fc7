"""Everything this project takes from wasmtime-py beyond its public API, in one place.

wasmtime-py (pinned in pyproject) wraps wasmtime's C API with ctypes. Its
public API is too slow for an inferlet's host calls and lacks two things the
host needs, so this module reaches into its private layer; nothing else in
the project imports `wasmtime._ffi`, `wasmtime._bindings` or
`wasmtime.component._*`:

- `ffi`, `component_types`: the ctypes declarations (value structs, kind
  constants) and component type classes `wit_codecs` reads and writes
  values through.
- `c_api`: the C functions the converters call, bound so that they keep the
  GIL (see `HoldingGIL`).
- `add_func`: registers a host function with a trampoline that converts its
  arguments and result with converters compiled once per function, instead
  of wasmtime-py's `func_impl`, which rebuilds the Python view of the
  function's types from the C API on every call and then walks them in
  Python (most of a host call's cost: tens to hundreds of microseconds).
- `cache_compound_types`: makes wasmtime-py's compound types keep their
  children (for the conversions it still does itself: the guest's exports).
- `install_epoch_deadline`: the store's epoch-deadline callback (CPU limits
  and terminate), which wasmtime-py binds but does not wrap.

tests/runtime exercise every bound function through this layer and compare
every converter with wasmtime-py's own on random values.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

from wasmtime import WasmtimeError, _bindings
from wasmtime import _ffi as ffi
from wasmtime.component import LinkerInstance
from wasmtime.component import _types as component_types
from wasmtime.component._enter import catch_exceptions
from wasmtime.component._linker import FUNCTIONS, func_finalize
from wasmtime.component._types import FuncType

__all__ = ["ffi", "component_types", "c_api", "add_func", "cache_compound_types", "install_epoch_deadline"]

# --------------------------------------------------------------------------- C functions that keep the GIL


class HoldingGIL:
    """The C functions the converters call (allocate/free small values,
    resource handles), bound so that they keep the GIL. wasmtime-py binds
    everything through `ctypes.CDLL`, which releases the GIL around each
    call: with 16 instance threads converting at once, each of these
    microsecond calls was a chance to lose the GIL and wait ~0.5 ms for it."""

    def __init__(self) -> None:
        library = ctypes.PyDLL(ffi.dll._name, handle=ffi.dll._handle)
        for name in ("wasmtime_component_vallist_delete", "wasmtime_component_valrecord_delete",
                     "wasmtime_component_valtuple_delete", "wasmtime_component_val_delete",
                     "wasmtime_component_val_new", "wasmtime_component_vallist_new_uninit",
                     "wasmtime_component_valtuple_new_uninit",
                     "wasmtime_component_valrecord_new_uninit", "wasm_byte_vec_delete", "wasm_byte_vec_new",
                     "wasmtime_component_resource_any_delete", "wasmtime_component_resource_any_to_host",
                     "wasmtime_component_resource_host_new", "wasmtime_component_resource_host_rep",
                     "wasmtime_component_resource_host_delete", "wasmtime_component_resource_host_to_any"):
            original = getattr(_bindings, "_" + name)
            function = getattr(library, name)
            function.argtypes, function.restype = original.argtypes, original.restype
            setattr(self, name, function)


c_api = HoldingGIL()

# --------------------------------------------------------------------------- host functions

Lifter = Callable[[Any], Callable[[int], Any]]  # component type -> (address of a value -> Python value)
Lowerer = Callable[[Any], Callable[[Any, Any, Any], None]]  # component type -> (store, value, C view) -> None

_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
# Function handle -> how to build its converters: (lifter, lowerer) until its
# first call, then (parameter lifts, result lower or None). Handles are never
# reused by wasmtime-py's slab, so an entry never goes stale.
_MAKERS: dict[int, tuple[Lifter, Lowerer]] = {}
_CODECS: dict[int, tuple[list[Callable[[int], Any]], Callable[[Any, Any, Any], None] | None]] = {}


def _codecs(key: int, ty_raw: Any, store: Any) -> tuple[list[Callable[[int], Any]], Any]:
    lifter, lowerer = _MAKERS[key]
    fty = FuncType._from_ptr(ty_raw, owner=store)
    result = fty.result
    codecs = ([lifter(ty) for _, ty in fty.params], lowerer(result) if result is not None else None)
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


def add_func(instance: LinkerInstance, name: str, func: Callable[..., Any], lifter: Lifter, lowerer: Lowerer) -> None:
    """`LinkerInstance.add_func` whose argument and result conversions are
    built once, on the first call, by `lifter` / `lowerer` (wit_codecs')
    from the function's types."""
    encoded = name.encode("utf-8")
    idx = FUNCTIONS.allocate(func)
    _MAKERS[idx] = (lifter, lowerer)
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
        cls = getattr(component_types, class_name, None)
        original = getattr(cls, prop, None) if cls is not None else None
        if not isinstance(original, property):
            continue  # already cached, or a wasmtime-py that changed shape
        cached = functools.cached_property(original.fget)
        cached.__set_name__(cls, prop)
        setattr(cls, prop, cached)


# --------------------------------------------------------------------------- epoch deadline

# wasmtime-py binds the C function but does not wrap it; its ctypes signature
# gives the callback types.
_DEADLINE_CALLBACK = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[1]
_DEADLINE_FINALIZER = _bindings._wasmtime_store_epoch_deadline_callback.argtypes[3]
_UPDATE_DEADLINE_CONTINUE = 0


def install_epoch_deadline(store: Any, check: Callable[[], int | str]) -> tuple[Any, ...]:
    """Calls `check` (on the thread running wasm, inside wasm) each time the
    store's epoch deadline passes: it returns the ticks until the next check
    to go on, or a message to stop the guest with a trap carrying it.

    Returns the ctypes callbacks, which the caller must keep alive as long
    as the store may call them."""

    def on_deadline(_context: Any, _data: Any, delta: Any, kind: Any) -> int:
        # Runs inside wasm: must not raise.
        try:
            verdict = check()
            if not isinstance(verdict, str):
                delta[0] = verdict
                kind[0] = _UPDATE_DEADLINE_CONTINUE
                return 0
        except Exception as e:  # noqa: BLE001
            verdict = f"deadline check failed: {e}"
        err = ffi.wasmtime_error_new(verdict.encode("utf-8"))
        return ctypes.cast(err, ctypes.c_void_p).value or 0

    callback = _DEADLINE_CALLBACK(on_deadline)
    finalizer = _DEADLINE_FINALIZER(lambda _data: None)
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, finalizer)
    return callback, finalizer
