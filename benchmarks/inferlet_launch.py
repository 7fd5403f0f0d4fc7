"""How fast an inferlet starts.

1. Component load: cold (compile the 18 MB componentize-py component) vs warm
   (deserialize the precompiled artifact from the on-disk cache).
2. Launch latency: from `Instance.start()` to the guest's first host call, for
   1, 16 and 128 concurrent launches of a trivial guest (one host call, then return).

Prints a table and, last, `ratio: X` = cold load time / warm load time.

    PYTHONPATH=. .venv/bin/python benchmarks/inferlet_launch.py [--repeats 5] [--counts 1,16,128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pie_runtime.component_cache import ComponentCache  # noqa: E402
from pie_runtime.instance import Instance  # noqa: E402
from pie_runtime.host.registry import Host  # noqa: E402
from tests.runtime.guests.build import build_guest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def measure_loads(wasm: Path, repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cold_cache = ComponentCache(Path(tmp), in_memory=False)
        started = time.perf_counter()
        cold_cache.load(wasm)
        cold = time.perf_counter() - started
        assert cold_cache.stats.last_source == "compiled"
        warm_times = []
        for _ in range(repeats):
            warm_cache = ComponentCache(Path(tmp), in_memory=False)  # a fresh process's view
            started = time.perf_counter()
            warm_cache.load(wasm)
            warm_times.append(time.perf_counter() - started)
            assert warm_cache.stats.last_source == "deserialized"
    return cold, statistics.median(warm_times)


def measure_launches(component, count: int) -> dict[str, float]:
    host = Host([], guest_output=lambda *a: None)
    instances = [Instance(host, component) for _ in range(count)]
    started = time.perf_counter()
    for inst in instances:
        inst.start()
    outcomes = [inst.wait(300) for inst in instances]
    wall = time.perf_counter() - started
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} launches failed, e.g. {failed[0].describe()}")
    latencies = sorted(inst.first_host_call_at - inst.launched_at for inst in instances)
    return {
        "median": statistics.median(latencies),
        "p90": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "max": latencies[-1],
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="warm loads to take the median of")
    parser.add_argument("--counts", default="1,16,128", help="concurrent launches to measure")
    args = parser.parse_args()

    wasm = build_guest("trivial")
    print(f"CPU: {cpu_model()}")
    print(f"guest: {wasm.name} ({wasm.stat().st_size / 1e6:.1f} MB)")
    cold, warm = measure_loads(wasm, args.repeats)
    print(f"component load   cold (compile): {_ms(cold)}")
    print(f"component load   warm (cached) : {_ms(warm)}  (median of {args.repeats})")

    component = ComponentCache(Path(tempfile.gettempdir()) / "pie-test-guests" / "precompiled").load(wasm)
    measure_launches(component, 1)  # warm-up: first-use costs in wasmtime and Python
    print("launch -> first host call (trivial guest, no model):")
    print(f"  {'concurrent':>10} {'median':>11} {'p90':>11} {'max':>11} {'all done':>11}")
    for count in (int(c) for c in args.counts.split(",")):
        r = measure_launches(component, count)
        print(f"  {count:>10} {_ms(r['median'])} {_ms(r['p90'])} {_ms(r['max'])} {_ms(r['wall'])}")
    print(f"ratio: {cold / warm:.1f}")


if __name__ == "__main__":
    main()
