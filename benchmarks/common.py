"""Shared helpers of the paper-evaluation benchmarks (inferlet_overhead, agentic, reasoning, roofline).

The machine these run on is shared and noisy, so every script reports a
*ratio* of arms measured in the same process, interleaved (A B A B ...) and
summarised by medians. This module holds the pieces they all need: loading
the engine, building inferlets, running N instances through the same
Host/ServingCore path `pie-run` uses, and the interleaved timing loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

INFERLETS = Path(__file__).resolve().parent / "inferlets"


# The vector ISA extensions that decide CPU kernel speed (what /proc/cpuinfo calls them).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _cpuinfo() -> tuple[str, list[str]]:
    name, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return name, flags


def cpu_flags() -> str:
    """The host's vector ISA extensions among ``ISA_FLAGS``, space-separated ("none known" if none)."""
    present = set(_cpuinfo()[1])
    return " ".join(f for f in ISA_FLAGS if f in present) or "none known"


def cpu_model() -> str:
    """The host CPU's model name, core count and ISA extensions (figures from different hosts compare
    with nothing: print this in every benchmark)."""
    return f"{_cpuinfo()[0]}, {os.cpu_count()} cores, ISA: {cpu_flags()}"


def model_arg(parser: argparse.ArgumentParser) -> None:
    from engine_jax.registry import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")


def load_engine(model: str, page_size: int = 16, num_pages: int | None = None) -> Any:
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model

    return Engine(load_model(model), page_size=page_size, num_pages=num_pages)


def build_inferlet(source: Path) -> Any:
    """Builds (content-hash cached) and loads (precompiled, cached) an inferlet component."""
    import tempfile

    from inferlet_toolchain.build import build
    from pie_runtime.component_cache import default_cache

    with tempfile.TemporaryDirectory(prefix="pie-bench-") as scratch:
        wasm = Path(build(source, output=Path(scratch) / f"{source.stem}.wasm", quiet=True))
        return default_cache().load(wasm)


@dataclass
class Round:
    """One batch of concurrent instances: their wall time, per-instance results and the core's stats."""

    wall: float
    values: list[str]
    latencies: list[float]
    stats: Any
    cpu: list[float] = field(default_factory=list)


class Server:
    """An engine + serving core + Wasm host, wired as `pie-run` wires them (pie_runtime/cli.py)."""

    def __init__(self, engine: Any, policy: str = "adaptive") -> None:
        from pie_runtime.serving import ServingCore
        from pie_runtime.host.registry import Host, ServedModel

        self.engine = engine
        self.core = ServingCore(engine, policy=policy).start()
        self.host = Host([ServedModel(engine.name, engine, self.core)], guest_output=self._guest_output)
        self.guest_lines: list[str] = []

    def _guest_output(self, instance_id: str, stream: str, text: str) -> None:
        self.guest_lines.append(f"[{instance_id} {stream}] {text}")

    def run(self, component: Any, argument_sets: Sequence[Sequence[str]]) -> Round:
        """Launches one instance per argument list, all at once; waits for all of them."""
        from pie_runtime.instance import Instance, InstanceLimits

        before = self.core.stats
        instances = [Instance(self.host, component, arguments=list(a), limits=InstanceLimits(memory_bytes=1 << 30))
                     for a in argument_sets]
        started = time.perf_counter()
        for inst in instances:
            inst.start()
        outcomes = [inst.wait(600) for inst in instances]
        wall = time.perf_counter() - started
        failed = [o for o in outcomes if not o.ok]
        if failed:
            tail = "\n".join(self.guest_lines[-20:])
            raise RuntimeError(f"{len(failed)} instances failed, e.g. {failed[0].describe()}\n{tail}")
        after = self.core.stats
        return Round(
            wall=wall,
            values=[o.value or "" for o in outcomes],
            latencies=[o.wall_seconds for o in outcomes],
            stats=_stats_delta(before, after),
            cpu=[o.cpu_seconds for o in outcomes],
        )

    def stop(self) -> None:
        self.core.stop()


def _stats_delta(before: Any, after: Any) -> dict[str, float]:
    keys = ("steps", "tokens_processed", "tokens_generated", "forwards_completed", "engine_seconds")
    delta = {k: getattr(after, k) - getattr(before, k) for k in keys}
    batches = after.batch_requests - before.batch_requests
    delta["mean_batch"] = sum(k * v for k, v in batches.items()) / max(1, sum(batches.values()))
    return delta


def interleave(arms: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Calls each arm once per repeat, alternating the order every repeat (A B, B A, ...)."""
    names = list(arms)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(arms[name]())
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_samples(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    return f"median {median(values) * scale:.3f}{unit} (min {min(values) * scale:.3f}, max {max(values) * scale:.3f}, n={len(values)})"


class StepRecorder:
    """Wraps `engine._run` (what both `Engine.step` and `generate` call) to timestamp every step.

    `intervals(n)` gives the start-to-start times of consecutive steps that
    were pure decode steps of exactly `n` one-token requests: in steady state
    that interval is the time per output token of every request, including
    whatever the loop around the engine does between steps. Medians of many
    intervals within a run resist the bursts of a shared machine far better
    than whole-run wall times do.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.records: list[tuple[float, float, int, int]] = []  # start, end, requests, tokens
        inner = engine._run

        def run(requests):
            start = time.perf_counter()
            out = inner(requests)
            self.records.append((start, time.perf_counter(), len(requests), sum(len(r.tokens) for r in requests)))
            return out

        engine._run = run

    def mark(self) -> int:
        return len(self.records)

    def intervals(self, since: int, n: int) -> list[float]:
        recs = self.records[since:]
        out = []
        for a, b in zip(recs, recs[1:]):
            if a[2] == n and a[3] == n and b[2] == n and b[3] == n:
                out.append(b[0] - a[0])
        return out

    def gaps(self, since: int, n: int) -> list[float]:
        """End-of-step to start-of-next-step times, same selection as `intervals`: the loop's own cost."""
        recs = self.records[since:]
        return [b[0] - a[1] for a, b in zip(recs, recs[1:])
                if a[2] == n and a[3] == n and b[2] == n and b[3] == n]

    def busy(self, since: int) -> float:
        return sum(e - s for s, e, _, _ in self.records[since:])


def release_components() -> None:
    """Drops wasmtime objects before interpreter shutdown (their finalizers fail if run during it)."""
    import gc

    gc.collect()


class CompileSpans:
    """Wall-clock spans (time.time()) of JAX tracing, lowering and compiling (or loading a cached executable)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[tuple[float, float]] = []
        from jax import monitoring

        monitoring.register_event_time_span_listener(self._record)

    def _record(self, event: str, start: float, end: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            with self._lock:
                self.spans.append((start, end))

    def within(self, start: float, end: float) -> float:
        """Seconds of compilation that overlap [start, end]."""
        with self._lock:
            return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.spans)
