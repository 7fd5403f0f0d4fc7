"""Component values <-> Python, compiled once per type instead of interpreted per call.

wasmtime-py converts every argument and result of a host call by walking
its component type in Python on each call: records look up their fields
and compare names, variants recompute whether they are "tagged" (by
collecting the Python classes of every case), and lists convert element by
element through fresh ctypes objects. For an inferlet's decode loop that
was most of a host call: lifting one `forward-request` took ~130 us and
lowering one `list<output>` ~100 us.

`lifter(ty)` / `lowerer(ty)` build a converter per type once: the field
names, case tables and child converters are fixed up front, values are read
at fixed offsets, and long lists of numbers move through numpy in one copy.
The values produced and accepted are wasmtime-py's (`Record` objects,
`Variant` for tagged variants, `None`/payload for untagged ones, `bytes` for
`list<u8>`), except resources: a handle the guest passes in is a `Handle`
(`rep(store)` gives the host's key) and the host returns new ones as
`NewHandle`. Flags, futures and streams use wasmtime-py's own conversion.
A lifter takes the address of a `wasmtime_component_val_t`; a lowerer
writes into one (a ctypes view of the destination).

The C functions called here keep the GIL (`wasmtime_compat.c_api`). Leans
on wasmtime-py's ctypes layer, reached only through `wasmtime_compat`;
tests/runtime compare every converter with wasmtime-py's own on random values.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np
from wasmtime import WasmtimeError

from pie_runtime.host.wasmtime_compat import c_api as _c
from pie_runtime.host.wasmtime_compat import component_types as t
from pie_runtime.host.wasmtime_compat import ffi

Val = ffi.wasmtime_component_val_t
Lift = Callable[[int], Any]  # address of a Val -> Python value (frees what the value owned)
Lower = Callable[[Any, Any, Any], None]  # (store, Python value, Val view) -> None

_BYTES = ctypes.POINTER(ffi.wasm_byte_t)
_ANY = ctypes.POINTER(ffi.wasmtime_component_resource_any_t)
_HOST = ctypes.POINTER(ffi.wasmtime_component_resource_host_t)


class Handle:
    """A resource handle the guest passed in (own or borrow). `rep(store)` is
    the key the host gave it when it was created."""

    __slots__ = ("_any",)

    def __init__(self, any_ptr: Any) -> None:
        self._any = any_ptr

    def rep(self, store: Any) -> int:
        host = _HOST()
        error = _c.wasmtime_component_resource_any_to_host(store._context(), self._any, ctypes.byref(host))
        if error:
            raise WasmtimeError._from_ptr(error)
        try:
            return _c.wasmtime_component_resource_host_rep(host)
        finally:
            _c.wasmtime_component_resource_host_delete(host)

    def __del__(self) -> None:
        any_ptr, self._any = self._any, None
        if any_ptr:
            try:
                _c.wasmtime_component_resource_any_delete(any_ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
                pass


class NewHandle:
    """A host resource to hand to the guest as `own`: `rep` is its key in the
    host's table, `kind` its resource type."""

    __slots__ = ("rep", "kind")

    def __init__(self, rep: int, kind: int) -> None:
        self.rep = rep
        self.kind = kind


_VAL_SIZE = ctypes.sizeof(Val)
_PAYLOAD = Val.of.offset
_ENTRY = ffi.wasmtime_component_valrecord_entry
_ENTRY_SIZE = ctypes.sizeof(_ENTRY)
_ENTRY_VAL = _ENTRY.val.offset
_BOOL = ffi.WASMTIME_COMPONENT_BOOL.value

# Numbers: (C kind, union field, numpy format of the payload, Python classes accepted).
_NUMBERS: dict[type, tuple[int, str, str, tuple[type, ...]]] = {
    t.Bool: (ffi.WASMTIME_COMPONENT_BOOL.value, "boolean", "?", (bool,)),
    t.S8: (ffi.WASMTIME_COMPONENT_S8.value, "s8", "i1", (int,)),
    t.U8: (ffi.WASMTIME_COMPONENT_U8.value, "u8", "u1", (int,)),
    t.S16: (ffi.WASMTIME_COMPONENT_S16.value, "s16", "<i2", (int,)),
    t.U16: (ffi.WASMTIME_COMPONENT_U16.value, "u16", "<u2", (int,)),
    t.S32: (ffi.WASMTIME_COMPONENT_S32.value, "s32", "<i4", (int,)),
    t.U32: (ffi.WASMTIME_COMPONENT_U32.value, "u32", "<u4", (int,)),
    t.S64: (ffi.WASMTIME_COMPONENT_S64.value, "s64", "<i8", (int,)),
    t.U64: (ffi.WASMTIME_COMPONENT_U64.value, "u64", "<u8", (int,)),
    t.F32: (ffi.WASMTIME_COMPONENT_F32.value, "f32", "<f4", (float,)),
    t.F64: (ffi.WASMTIME_COMPONENT_F64.value, "f64", "<f8", (float,)),
}


# The C type of each number's payload.
_C_TYPES = {t.Bool: ctypes.c_bool, t.S8: ctypes.c_int8, t.U8: ctypes.c_uint8, t.S16: ctypes.c_int16,
            t.U16: ctypes.c_uint16, t.S32: ctypes.c_int32, t.U32: ctypes.c_uint32, t.S64: ctypes.c_int64,
            t.U64: ctypes.c_uint64, t.F32: ctypes.c_float, t.F64: ctypes.c_double}
_INT_BOUNDS = {kind: (int(np.iinfo(fmt).min), int(np.iinfo(fmt).max))
               for kind, (_, _, fmt, classes) in _NUMBERS.items() if classes == (int,)}


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _view(address: int) -> Any:
    return Val.from_address(address)


def _is_plain(ty: Any) -> bool:
    """Values of this type own no C memory (nothing to reset before a container is freed)."""
    return type(ty) in _NUMBERS or isinstance(ty, t.Char)


# ---------------------------------------------------------------------------- lifting
# A lifter takes the address of a C value and reads it with `from_address`
# at fixed offsets: far fewer ctypes objects than walking `c.of.list.data[i]`.

_u8 = ctypes.c_uint8.from_address
_size = ctypes.c_size_t.from_address
_pointer = ctypes.c_void_p.from_address
_vec = ffi.wasm_byte_vec_t.from_address
_list = ffi.wasmtime_component_vallist_t.from_address
_record = ffi.wasmtime_component_valrecord_t.from_address
_tuple = ffi.wasmtime_component_valtuple_t.from_address
_VARIANT_VAL = _PAYLOAD + ffi.wasmtime_component_valvariant_t.val.offset
_RESULT_VAL = _PAYLOAD + ffi.wasmtime_component_valresult_t.val.offset
_LIST_DATA = _PAYLOAD + ffi.wasmtime_component_vallist_t.data.offset
_SMALL_LIST = 8  # up to this many numbers, reading them one by one beats numpy


def lifter(ty: Any) -> Lift:
    """A function turning the C value at an address, of type `ty`, into wasmtime-py's Python value."""
    kind = type(ty)
    if kind in _NUMBERS:
        read = _number_reader(kind)
        return lambda addr: read(addr + _PAYLOAD)
    if kind is t.Char:
        return lambda addr: chr(ctypes.c_uint32.from_address(addr + _PAYLOAD).value)
    if kind in (t.String, t.EnumType):
        return _lift_text
    if kind is t.ListType:
        return _list_lifter(ty)
    if kind is t.RecordType:
        return _record_lifter(ty)
    if kind is t.TupleType:
        return _tuple_lifter(ty)
    if kind in (t.VariantType, t.OptionType, t.ResultType):
        return _variant_lifter(ty)
    if kind in (t.OwnType, t.BorrowType):
        return _lift_handle
    return lambda addr: ty.convert_from_c(_view(addr))


def _lift_handle(addr: int) -> Handle:
    slot = _pointer(addr + _PAYLOAD)
    any_ptr, slot.value = slot.value, None  # ours now: the value must not free it
    return Handle(ctypes.cast(any_ptr, _ANY))


def _number_reader(kind: type) -> Callable[[int], Any]:
    """Reads a number of component type `kind` stored at an address."""
    at = _C_TYPES[kind].from_address
    return lambda addr: at(addr).value


def _take_text(vec_addr: int) -> str:
    """Decodes and frees a `wasm_byte_vec_t` holding UTF-8."""
    vec = _vec(vec_addr)
    text = ctypes.string_at(vec.data, vec.size).decode("utf-8") if vec.size else ""
    _c.wasm_byte_vec_delete(ctypes.byref(vec))
    return text


def _lift_text(addr: int) -> str:
    return _take_text(addr + _PAYLOAD)


def _numbers_dtype(fmt: str) -> np.dtype:
    """One C value as a numpy record: the payload field at its offset, the rest padding."""
    return np.dtype({"names": ["kind", "value"], "formats": ["u1", fmt],
                     "offsets": [0, _PAYLOAD], "itemsize": _VAL_SIZE})


def _list_lifter(ty: t.ListType) -> Lift:
    element = ty.element
    if type(element) in _NUMBERS:
        dtype = _numbers_dtype(_NUMBERS[type(element)][2])
        read = _number_reader(type(element))
        as_bytes = isinstance(element, t.U8)

        def lift_numbers(addr: int) -> Any:
            n = _size(addr + _PAYLOAD).value
            data = _pointer(addr + _LIST_DATA).value or 0
            if as_bytes:
                out: Any = np.frombuffer((ctypes.c_char * (n * _VAL_SIZE)).from_address(data), dtype=dtype)[
                    "value"].tobytes() if n else b""
            elif n <= _SMALL_LIST:
                out = [read(data + i * _VAL_SIZE + _PAYLOAD) for i in range(n)]
            else:
                raw = (ctypes.c_char * (n * _VAL_SIZE)).from_address(data)
                out = np.frombuffer(raw, dtype=dtype)["value"].tolist()
            _c.wasmtime_component_vallist_delete(ctypes.byref(_list(addr + _PAYLOAD)))
            return out

        return lift_numbers

    lift_element = lifter(element)
    plain = _is_plain(element)

    def lift_list(addr: int) -> list:
        n = _size(addr + _PAYLOAD).value
        data = _pointer(addr + _LIST_DATA).value or 0
        out = []
        try:
            for i in range(n):
                item = data + i * _VAL_SIZE
                out.append(lift_element(item))
                if not plain:
                    _u8(item).value = _BOOL  # its memory is freed: the list must not free it again
        finally:
            _c.wasmtime_component_vallist_delete(ctypes.byref(_list(addr + _PAYLOAD)))
        return out

    return lift_list


def _record_lifter(ty: t.RecordType) -> Lift:
    fields = [(name, lifter(fty), _is_plain(fty)) for name, fty in ty.fields]

    def lift_record(addr: int) -> t.Record:
        base = (_pointer(addr + _LIST_DATA).value or 0) + _ENTRY_VAL
        out = t.Record()
        try:
            for i, (name, lift, plain) in enumerate(fields):
                item = base + i * _ENTRY_SIZE
                setattr(out, name, lift(item))
                if not plain:
                    _u8(item).value = _BOOL
        finally:
            _c.wasmtime_component_valrecord_delete(ctypes.byref(_record(addr + _PAYLOAD)))
        return out

    return lift_record


def _tuple_lifter(ty: t.TupleType) -> Lift:
    elements = [(lifter(ety), _is_plain(ety)) for ety in ty.elements]

    def lift_tuple(addr: int) -> tuple:
        base = _pointer(addr + _LIST_DATA).value or 0
        out = []
        try:
            for i, (lift, plain) in enumerate(elements):
                item = base + i * _VAL_SIZE
                out.append(lift(item))
                if not plain:
                    _u8(item).value = _BOOL
        finally:
            _c.wasmtime_component_valtuple_delete(ctypes.byref(_tuple(addr + _PAYLOAD)))
        return tuple(out)

    return lift_tuple


def _variant_lifter(ty: Any) -> Lift:
    tagged = ty._tagged()
    cases = {name: (lifter(cty) if cty is not None else None) for name, cty in ty._cases()}
    plain = {name: cty is not None and _is_plain(cty) for name, cty in ty._cases()}

    def payload(tag: str, boxed: int | None) -> Any:
        if tag not in cases:
            raise ValueError(f"tag {tag} not found in variant cases")
        lift = cases[tag]
        if lift is None:
            return t.Variant(tag) if tagged else None
        value = lift(boxed)
        item = _view(boxed)
        if not plain[tag]:
            item.kind = _BOOL
        _c.wasmtime_component_val_delete(ctypes.byref(item))
        return t.Variant(tag, value) if tagged else value

    if isinstance(ty, t.OptionType):
        def lift_option(addr: int) -> Any:
            boxed = _pointer(addr + _PAYLOAD).value
            return payload("some" if boxed else "none", boxed)
        return lift_option
    if isinstance(ty, t.ResultType):
        def lift_result(addr: int) -> Any:
            is_ok = _u8(addr + _PAYLOAD).value
            return payload("ok" if is_ok else "err", _pointer(addr + _RESULT_VAL).value)
        return lift_result

    def lift_variant(addr: int) -> Any:
        tag = _take_text(addr + _PAYLOAD)
        return payload(tag, _pointer(addr + _VARIANT_VAL).value)

    return lift_variant


# ---------------------------------------------------------------------------- lowering


def lowerer(ty: Any) -> Lower:
    """A function writing a Python value of type `ty` into a C value (a `Val` view)."""
    kind = type(ty)
    if kind in _NUMBERS:
        c_kind, field, _, classes = _NUMBERS[kind]

        low, high = _INT_BOUNDS.get(kind, (None, None))

        def lower_number(store: Any, value: Any, c: Any) -> None:
            if not isinstance(value, classes):
                raise TypeError(f"expected {classes[0].__name__} for {kind.__name__} type, got {type(value).__name__}")
            if low is not None and not low <= value <= high:
                raise OverflowError(f"{value} is outside the range of {kind.__name__}")
            c.kind = c_kind
            setattr(c.of, field, value)

        return lower_number
    if kind is t.String:
        return _lower_string
    if kind is t.ListType:
        return _list_lowerer(ty)
    if kind is t.RecordType:
        return _record_lowerer(ty)
    if kind in (t.VariantType, t.OptionType, t.ResultType):
        return _variant_lowerer(ty)
    if kind is t.TupleType:
        return _tuple_lowerer(ty)
    if kind is t.OwnType:
        fallback = ty.convert_to_c
        return lambda store, value, c: (_lower_new_handle(store, value, c) if isinstance(value, NewHandle)
                                        else fallback(store, value, ctypes.pointer(c)))
    # Chars, enums, flags, borrowed resources, futures: wasmtime-py's own
    # conversion, which writes through a pointer.
    return lambda store, value, c: ty.convert_to_c(store, value, ctypes.pointer(c))


def _name_vec(name: str) -> Callable[[], Any]:
    """A maker of fresh C copies of `name` (the value that receives one owns it)."""
    encoded = name.encode("utf-8")
    buffer = (ctypes.c_char * max(1, len(encoded))).from_buffer_copy(encoded or b"\0")
    size = len(encoded)
    data = ctypes.cast(buffer, ctypes.POINTER(ffi.wasm_byte_t))

    def make() -> Any:
        vec = ffi.wasm_byte_vec_t()
        _c.wasm_byte_vec_new(ctypes.byref(vec), size, data)
        return vec

    return make


def _text_vec(text: str) -> Any:
    """A fresh C copy of `text` as UTF-8 (the value that receives it owns it)."""
    encoded = text.encode("utf-8")
    vec = ffi.wasm_byte_vec_t()
    _c.wasm_byte_vec_new(ctypes.byref(vec), len(encoded), ctypes.cast(ctypes.c_char_p(encoded), _BYTES))
    return vec


def _lower_new_handle(store: Any, value: NewHandle, c: Any) -> None:
    host = _c.wasmtime_component_resource_host_new(True, value.rep, value.kind)
    try:
        any_ptr = _ANY()
        error = _c.wasmtime_component_resource_host_to_any(store._context(), host, ctypes.byref(any_ptr))
        if error:
            raise WasmtimeError._from_ptr(error)
    finally:
        _c.wasmtime_component_resource_host_delete(host)
    c.kind = ffi.WASMTIME_COMPONENT_RESOURCE.value
    c.of.resource = any_ptr


def _lower_string(store: Any, value: Any, c: Any) -> None:
    if not isinstance(value, str):
        raise TypeError("expected string type")
    c.kind = ffi.WASMTIME_COMPONENT_STRING.value
    c.of.string = _text_vec(value)


def _list_lowerer(ty: t.ListType) -> Lower:
    element = ty.element
    list_kind = ffi.WASMTIME_COMPONENT_LIST.value
    if type(element) in _NUMBERS:
        c_kind, _, fmt, classes = _NUMBERS[type(element)]
        dtype = _numbers_dtype(fmt)
        as_bytes = isinstance(element, t.U8)
        # numpy dtype kinds a list may arrive as (a list of ints is fine for floats)
        kinds = {bool: "b", int: "iub", float: "iuf"}[classes[0]]
        bounds = (np.iinfo(fmt).min, np.iinfo(fmt).max) if classes[0] is int else None

        lower_one = lowerer(element)

        def lower_numbers(store: Any, value: Any, c: Any) -> None:
            if as_bytes:
                if not isinstance(value, (bytes, bytearray)):
                    raise TypeError("expected bytes value")
            elif not isinstance(value, list):
                raise TypeError("expected list value")
            n = len(value)
            raw = ffi.wasmtime_component_vallist_t()
            _c.wasmtime_component_vallist_new_uninit(raw, n)
            data = _address(raw.data)
            try:
                if n <= _SMALL_LIST and not as_bytes:
                    for i, item in enumerate(value):
                        lower_one(store, item, _view(data + i * _VAL_SIZE))
                elif n:
                    if as_bytes:
                        column = np.frombuffer(value, dtype=np.uint8)
                    else:
                        column = np.asarray(value)
                        if column.ndim != 1 or column.dtype.kind not in kinds:
                            raise TypeError(f"expected a list of {classes[0].__name__} "
                                            f"for {type(element).__name__} elements")
                        if bounds is not None and (column.min() < bounds[0] or column.max() > bounds[1]):
                            raise OverflowError(f"a value is outside the range of {type(element).__name__}")
                    packed = np.zeros(n, dtype=dtype)
                    packed["kind"] = c_kind
                    packed["value"] = column
                    ctypes.memmove(data, packed.ctypes.data, n * _VAL_SIZE)
            except BaseException:
                for i in range(n):
                    _u8(data + i * _VAL_SIZE).value = _BOOL
                _c.wasmtime_component_vallist_delete(ctypes.byref(raw))
                raise
            c.kind = list_kind
            c.of.list = raw

        return lower_numbers

    lower_element = lowerer(element)

    def lower_list(store: Any, value: Any, c: Any) -> None:
        if not isinstance(value, list):
            raise TypeError("expected list value")
        raw = ffi.wasmtime_component_vallist_t()
        _c.wasmtime_component_vallist_new_uninit(raw, len(value))
        _fill(store, ((lower_element, item) for item in value), raw, _c.wasmtime_component_vallist_delete)
        c.kind = list_kind
        c.of.list = raw

    return lower_list


def _fill(store: Any, items: Any, raw: Any, delete: Callable[[Any], None]) -> None:
    """Lowers (lowerer, value) pairs into the fresh values of a C list or tuple;
    on a failure frees it (the values not written yet marked as owning nothing)."""
    base = _address(raw.data)
    done = 0
    try:
        for lower, item in items:
            lower(store, item, _view(base + done * _VAL_SIZE))
            done += 1
    except BaseException:
        for j in range(done, raw.size):
            _view(base + j * _VAL_SIZE).kind = _BOOL
        delete(ctypes.byref(raw))
        raise


def _tuple_lowerer(ty: t.TupleType) -> Lower:
    elements = [lowerer(ety) for ety in ty.elements]
    tuple_kind = ffi.WASMTIME_COMPONENT_TUPLE.value

    def lower_tuple(store: Any, value: Any, c: Any) -> None:
        if not isinstance(value, tuple):
            raise TypeError("expected tuple type")
        if len(value) != len(elements):
            raise TypeError("tuple length mismatch")
        raw = ffi.wasmtime_component_valtuple_t()
        _c.wasmtime_component_valtuple_new_uninit(raw, len(elements))
        _fill(store, zip(elements, value), raw, _c.wasmtime_component_valtuple_delete)
        c.kind = tuple_kind
        c.of.tuple = raw

    return lower_tuple


def _record_lowerer(ty: t.RecordType) -> Lower:
    fields = [(_name_vec(name), name, lowerer(fty)) for name, fty in ty.fields]
    record_kind = ffi.WASMTIME_COMPONENT_RECORD.value

    def lower_record(store: Any, value: Any, c: Any) -> None:
        raw = ffi.wasmtime_component_valrecord_t()
        _c.wasmtime_component_valrecord_new_uninit(raw, len(fields))
        base = _address(raw.data)
        done = 0
        try:
            for make_name, name, lower in fields:
                entry = _ENTRY.from_address(base + done * _ENTRY_SIZE)
                lower(store, getattr(value, name), entry.val)
                entry.name = make_name()
                done += 1
        except BaseException:
            for j in range(done, len(fields)):
                entry = _ENTRY.from_address(base + j * _ENTRY_SIZE)
                entry.val.kind = _BOOL
                entry.name = _text_vec("")
            _c.wasmtime_component_valrecord_delete(ctypes.byref(raw))
            raise
        c.kind = record_kind
        c.of.record = raw

    return lower_record


def _variant_lowerer(ty: Any) -> Lower:
    tagged = ty._tagged()
    cases = []  # (name, lowerer or None, classes matched when untagged)
    for name, cty in ty._cases():
        if cty is None:
            cases.append((name, None, ()))
            continue
        classes: set[type] = set()
        cty.add_classes(classes)
        if isinstance(cty, t.OwnType):
            classes.add(NewHandle)
        cases.append((name, lowerer(cty), tuple(classes)))
    by_tag = {name: lower for name, lower, _ in cases}
    tag_vecs = {name: _name_vec(name) for name, _, _ in cases}

    def choose(value: Any) -> tuple[str, Lower | None, Any]:
        if tagged:
            if not isinstance(value, t.Variant):
                raise TypeError("expected Variant type")
            if value.tag not in by_tag:
                raise ValueError("value not valid for this variant")
            return value.tag, by_tag[value.tag], value.payload
        for name, lower, classes in cases:
            if lower is None:
                if value is None:
                    return name, None, None
            elif isinstance(value, classes):
                return name, lower, value
        raise ValueError("value not valid for this variant")

    def boxed(store: Any, lower: Lower | None, payload: Any) -> Any:
        if lower is None:
            return None
        raw = Val()
        lower(store, payload, raw)
        return _c.wasmtime_component_val_new(ctypes.byref(raw))

    if isinstance(ty, t.OptionType):
        option_kind = ffi.WASMTIME_COMPONENT_OPTION.value

        def lower_option(store: Any, value: Any, c: Any) -> None:
            _, lower, payload = choose(value)
            c.kind = option_kind
            c.of.option = boxed(store, lower, payload)

        return lower_option
    if isinstance(ty, t.ResultType):
        result_kind = ffi.WASMTIME_COMPONENT_RESULT.value

        def lower_result(store: Any, value: Any, c: Any) -> None:
            name, lower, payload = choose(value)
            c.kind = result_kind
            c.of.result.is_ok = name == "ok"
            c.of.result.val = boxed(store, lower, payload)

        return lower_result
    variant_kind = ffi.WASMTIME_COMPONENT_VARIANT.value

    def lower_variant(store: Any, value: Any, c: Any) -> None:
        name, lower, payload = choose(value)
        c.kind = variant_kind
        c.of.variant.discriminant = tag_vecs[name]()
        c.of.variant.val = boxed(store, lower, payload)

    return lower_variant
