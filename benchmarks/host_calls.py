"""Cost of one host call: wasmtime-py's own trampoline vs pie_runtime's (`host/wasmtime_compat.py`).

A probe guest (tests/runtime/guests/probe.py, mode `calls`) makes 3*N cheap
host calls (tokenizer encode, model info, instance id) on a tiny random model.
The baseline arm binds the host functions with wasmtime-py's `add_func` (its
own conversions, new resources as `ResourceHost`); the second with
`wasmtime_compat.add_func`, whose conversions are compiled once per type
(`pie_runtime/host/wit_codecs.py`). The type cache patches wasmtime-py's classes
for the whole process, so the baseline runs first (the arms cannot be
interleaved). Prints the CPU model, us per call and `ratio: X` last
(baseline / ours).

    PYTHONPATH=. .venv/bin/python benchmarks/host_calls.py [--calls N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from unittest import mock

# The probe guest and the tiny model builder live in the test tree.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_model
from engine_jax.engine import Engine
from wasmtime.component import ResourceHost

from pie_runtime.host import linker, wasmtime_compat
from pie_runtime.host.registry import Host, ServedModel
from pie_runtime.serving import ServingCore
from tests.helpers.engine_models import load_test_model
from tests.helpers.hf_models import build_model_dir
from tests.runtime.guests.fixtures import component_cache, launch, load_guest


def us_per_call(host: Host, probe, n: int, repeats: int = 3) -> float:
    launch(host, probe, "calls", "10").wait(120)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        out = launch(host, probe, "calls", str(n)).wait(600)
        assert out.ok, out.describe()
        best = min(best, out.wall_seconds / out.host_calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="loop iterations (3 host calls each)")
    args = parser.parse_args()

    model = load_test_model(build_model_dir("llama", Path(tempfile.mkdtemp(prefix="pie-bench-"))))
    engine = Engine(model, page_size=4, num_pages=64)
    core = ServingCore(engine).start()
    probe = load_guest(component_cache(), "probe")
    try:
        plain = lambda inst, name, fn, lifter, lowerer: inst.add_func(name, fn)  # noqa: E731
        def resource_host(ctx, kind, obj):  # what wasmtime-py's own conversion accepts
            return ResourceHost.own(ctx.table.insert(kind, obj), int(kind))

        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.object(wasmtime_compat, "add_func", plain))
            patches.enter_context(mock.patch.object(wasmtime_compat, "cache_compound_types", lambda: None))
            for module in linker.INTERFACES.values():  # each interface module makes its own new handles
                if hasattr(module, "own"):
                    patches.enter_context(mock.patch.object(module, "own", resource_host))
            baseline = us_per_call(Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None),
                                   probe, args.calls)
        ours = us_per_call(Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None),
                           probe, args.calls)
    finally:
        core.stop()
    print(f"CPU: {cpu_model()}")
    print(f"wasmtime-py trampoline: {baseline:.1f} us/call")
    print(f"pie_runtime (wasmtime_compat.add_func): {ours:.1f} us/call")
    print(f"ratio: {baseline / ours:.2f}")


if __name__ == "__main__":
    main()
