"""The linker every instance is instantiated through, the error policy of host calls, and each instance's WASI.

`build_linker` binds every function of the `inferlet` world, one module per
WIT interface (`INTERFACES`), plus WASI p2. Each host function takes
`(ctx, store, *wit_args)`; `_bind` wraps it with the instance lookup and
the failure rules:

- An expected failure (`PieError` from the serving core, bad arguments found
  by the host) becomes the WIT `error` record for functions returning
  `result`.
- In a function without a `result`, or on a host bug, the call traps with a
  clear message: the instance ends, the server goes on.
- Host functions never let a plain Python exception escape into wasmtime-py:
  it would be parked in a process-global slot and could resurface in another
  instance's thread. They raise `WasmtimeError` (a trap) instead.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Callable

import wasmtime
from wasmtime import WasmtimeError
from wasmtime.component import Linker, ResourceType

from engine_jax.batch import EngineInputError
from pie_runtime.errors import PieError
from pie_runtime.guest_output import LineSink, OutputBudget
from pie_runtime.host import (futures, grammar, inference, kvstore, messaging, model, runtime, wasmtime_compat,
                              wit_codecs)
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.context import InstanceContext, InstanceTerminated, bound_context, current_context
from pie_runtime.host.contract import interface_name
from pie_runtime.host.conversions import error_record
from pie_runtime.host.resource_table import release

log = logging.getLogger("pie_runtime.host")

# WIT interface -> the module binding it (its RESOURCES: (name, Kind), FUNCTIONS: (wit name, function, returns result)).
INTERFACES = {
    "types": futures,
    "runtime": runtime,
    "messaging": messaging,
    "kvstore": kvstore,
    "inference": inference,
    "model": model,
    "grammar": grammar,
}


def _bind(fn: Callable[..., Any], returns_result: bool, name: str) -> Callable[..., Any]:
    """Wraps a host function with the context lookup and the error policy."""

    def call(store: Any, *args: Any) -> Any:
        ctx = current_context()
        ctx.host_calls += 1
        if ctx.first_call_at is None:
            ctx.first_call_at = time.perf_counter()
        try:
            if ctx.stopped.done():  # terminated (and maybe released already): no more host work
                raise InstanceTerminated(ctx.stopped.result())
            return fn(ctx, store, *args)
        except PieError as e:
            if returns_result:
                return error_record(e.code, e.message)
            trap = f"{name}: {e.code}: {e.message}"
        except EngineInputError as e:
            if returns_result:
                return error_record("invalid-argument", str(e))
            trap = f"{name}: invalid-argument: {e}"
        except InstanceTerminated as e:
            trap = f"instance stopped: {e}"
        except WasmtimeError as e:
            trap = str(e)
        except Exception as e:  # noqa: BLE001 - a host bug must not take the server down
            log.error("host function %s failed:\n%s", name, traceback.format_exc())
            if returns_result:
                return error_record("internal", f"{name}: {type(e).__name__}: {e}")
            trap = f"{name}: internal error: {type(e).__name__}: {e}"
        ctx.host_trap = trap
        raise WasmtimeError(trap)

    return call


def _dtor(store: Any, rep: int) -> None:
    ctx = bound_context()
    if ctx is None:
        return
    item = ctx.table.pop(rep)
    if item is not None:
        try:
            release(*item)
        except Exception:  # noqa: BLE001 - a destructor must not trap the guest
            log.exception("dropping %s failed", item[0].name)


def provided_interfaces() -> list[str]:
    """The `pie:inferlet` interfaces this host implements (a component may import these)."""
    return list(INTERFACES)


def bound_function_names() -> list[str]:
    """Every `interface#function` this host implements (tests compare it with the WIT)."""
    return [f"{interface_name(i)}#{name}" for i, module in INTERFACES.items() for name, _, _ in module.FUNCTIONS]


def build_linker(engine: wasmtime.Engine) -> Linker:
    """A linker with WASI p2 and every function of the `inferlet` world."""
    wasmtime_compat.cache_compound_types()
    linker = Linker(engine)
    linker.add_wasip2()
    with linker.root() as root:
        for iface, module in INTERFACES.items():
            with root.add_instance(interface_name(iface)) as inst:
                for res_name, kind in module.RESOURCES:
                    inst.add_resource(res_name, ResourceType.host(int(kind)), _dtor)
                for name, fn, returns_result in module.FUNCTIONS:
                    wasmtime_compat.add_func(inst, name, _bind(fn, returns_result, name),
                                             wit_codecs.lifter, wit_codecs.lowerer)
    return linker


def make_wasi(ctx: InstanceContext, grant: Capabilities, program_name: str = "inferlet") -> tuple[wasmtime.WasiConfig, list[LineSink]]:
    """WASI for one instance: no stdin, no env, no network, stdout/stderr to the sink, only granted dirs."""
    wasi = wasmtime.WasiConfig()
    wasi.argv = [program_name, *ctx.arguments]
    sinks = []
    def emit(stream: str, text: str) -> None:
        if stream == "stderr":
            ctx.stderr_tail.append(text)
        ctx.host.guest_output(ctx.instance_id, stream, text)

    limits = ctx.host.limits
    budget = OutputBudget(limits.output_bytes)
    for stream in ("stdout", "stderr"):
        sink = LineSink(lambda text, s=stream: emit(s, text), budget, limits.output_line_bytes)
        sinks.append(sink)
        setattr(wasi, f"{stream}_custom", sink.write)
    for directory in grant.fs:
        wasi.preopen_dir(directory, directory, fs_mutable=False)
    for directory in grant.fs_rw:
        wasi.preopen_dir(directory, directory, fs_mutable=True)
    return wasi, sinks
