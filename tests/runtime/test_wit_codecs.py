"""The compiled converters (pie_runtime/host/wit_codecs.py) agree with wasmtime-py's own.

Every parameter and result type of every `pie:inferlet` function, taken from
a real component, gets random values (hypothesis): what our lowerer writes,
wasmtime-py's lifter must read back unchanged, and the other way round.
Types that hold resources are left to wasmtime-py and skipped here (the host
tests run them for real).
"""

from __future__ import annotations

import ctypes
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pie_runtime.component_cache import shared_engine
from pie_runtime.host import wit_codecs
from pie_runtime.host.wasmtime_compat import component_types as t
from pie_runtime.host.wasmtime_compat import ffi

_INT_RANGES = {
    t.S8: (-(1 << 7), (1 << 7) - 1), t.U8: (0, (1 << 8) - 1),
    t.S16: (-(1 << 15), (1 << 15) - 1), t.U16: (0, (1 << 16) - 1),
    t.S32: (-(1 << 31), (1 << 31) - 1), t.U32: (0, (1 << 32) - 1),
    t.S64: (-(1 << 63), (1 << 63) - 1), t.U64: (0, (1 << 64) - 1),
}


def _has_resource(ty) -> bool:
    if isinstance(ty, (t.OwnType, t.BorrowType, t.FutureType, t.StreamType)):
        return True
    if isinstance(ty, t.ListType):
        return _has_resource(ty.element)
    if isinstance(ty, t.RecordType):
        return any(_has_resource(f) for _, f in ty.fields)
    if isinstance(ty, t.TupleType):
        return any(_has_resource(e) for e in ty.elements)
    if isinstance(ty, (t.VariantType, t.OptionType, t.ResultType)):
        return any(c is not None and _has_resource(c) for _, c in ty._cases())
    return False


def _record(names, values):
    record = t.Record()
    for name, value in zip(names, values):
        setattr(record, name, value)
    return record


def values_of(ty) -> st.SearchStrategy:
    """Python values of component type `ty`, as wasmtime-py represents them."""
    kind = type(ty)
    if kind is t.Bool:
        return st.booleans()
    if kind in _INT_RANGES:
        lo, hi = _INT_RANGES[kind]
        return st.integers(lo, hi)
    if kind is t.F32:
        return st.floats(width=32, allow_nan=False)
    if kind is t.F64:
        return st.floats(allow_nan=False)
    if kind is t.Char:
        return st.characters(exclude_categories=("Cs",))
    if kind is t.String:
        return st.text(max_size=12)
    if kind is t.EnumType:
        return st.sampled_from(ty.names)
    if kind is t.ListType:
        if isinstance(ty.element, t.U8):
            return st.binary(max_size=40)
        return st.lists(values_of(ty.element), max_size=6)
    if kind is t.RecordType:
        names = [name for name, _ in ty.fields]
        return st.tuples(*(values_of(f) for _, f in ty.fields)).map(lambda vs: _record(names, vs))
    if kind is t.TupleType:
        return st.tuples(*(values_of(e) for e in ty.elements))
    tagged = ty._tagged()
    options = []
    for name, case in ty._cases():
        if case is None:
            options.append(st.just(t.Variant(name) if tagged else None))
        elif tagged:
            options.append(values_of(case).map(lambda v, name=name: t.Variant(name, v)))
        else:
            options.append(values_of(case))
    return st.one_of(options)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, t.Record):
        return isinstance(b, t.Record) and a.__dict__.keys() == b.__dict__.keys() and all(
            _same(v, getattr(b, k)) for k, v in a.__dict__.items())
    if isinstance(a, t.Variant):
        return isinstance(b, t.Variant) and a.tag == b.tag and _same(a.payload, b.payload)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _inferlet_types(component) -> list[tuple[str, object]]:
    engine = shared_engine()
    found = []
    for iface, item in component.type.imports(engine).items():
        if not iface.startswith("pie:inferlet/"):
            continue
        for name, export in item.ty.exports(engine).items():
            fty = export.ty
            if not isinstance(fty, t.FuncType):
                continue
            for pname, pty in fty.params:
                found.append((f"{iface}#{name}({pname})", pty))
            if fty.result is not None:
                found.append((f"{iface}#{name} -> result", fty.result))
    return found


@pytest.fixture(scope="module")
def inferlet_types(probe):
    types = _inferlet_types(probe)
    assert len(types) > 40, "expected every pie:inferlet function's types"
    return types


def _round_trips(ty, value) -> None:
    lift, lower = wit_codecs.lifter(ty), wit_codecs.lowerer(ty)
    # ours -> wasmtime-py
    c = wit_codecs.Val()
    lower(None, value, c)
    back = ty.convert_from_c(c)
    assert _same(back, value), f"ours lowered {value!r}, wasmtime-py lifted {back!r}"
    # wasmtime-py -> ours
    c = wit_codecs.Val()
    ty.convert_to_c(None, value, ctypes.pointer(c))
    back = lift(ctypes.addressof(c))
    assert _same(back, value), f"wasmtime-py lowered {value!r}, ours lifted {back!r}"
    # ours -> ours
    c = wit_codecs.Val()
    lower(None, value, c)
    assert _same(lift(ctypes.addressof(c)), value)


def test_every_plain_type_round_trips(inferlet_types):
    """Random values of every resource-free parameter/result type cross both ways unchanged."""
    checked = 0
    for where, ty in inferlet_types:
        if _has_resource(ty):
            continue

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(value=values_of(ty))
        def check(value):
            try:
                _round_trips(ty, value)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from None

        check()
        checked += 1
    assert checked > 20


@pytest.fixture(scope="module")
def u32_list(inferlet_types):
    for _, ty in inferlet_types:
        if isinstance(ty, t.ListType) and isinstance(ty.element, t.U32):
            return ty
    raise AssertionError("the contract has no list<u32>")


@given(values=st.lists(st.integers(0, (1 << 32) - 1), max_size=300))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_long_number_lists_round_trip(u32_list, values):
    """The bulk (numpy) path for lists of numbers, over lengths a single field never reaches."""
    _round_trips(u32_list, values)


def test_bad_values_are_type_errors(u32_list):
    lower = wit_codecs.lowerer(u32_list)
    for bad in ([1.5], "abc", [[1]], (1, 2)):
        with pytest.raises(TypeError):
            lower(None, bad, wit_codecs.Val())
    for out_of_range in ([1 << 40], [-1]):
        with pytest.raises(OverflowError):
            lower(None, out_of_range, wit_codecs.Val())


def test_lowered_values_carry_wasmtime_kinds(u32_list):
    """A lowered list holds the C kinds and payloads wasmtime-py would write."""
    c = wit_codecs.Val()
    wit_codecs.lowerer(u32_list)(None, [7, 8], c)
    assert c.kind == ffi.WASMTIME_COMPONENT_LIST.value
    assert c.of.list.size == 2
    assert [c.of.list.data[i].kind for i in range(2)] == [ffi.WASMTIME_COMPONENT_U32.value] * 2
    assert [c.of.list.data[i].of.u32 for i in range(2)] == [7, 8]
    ffi.wasmtime_component_vallist_delete(ctypes.byref(c.of.list))
