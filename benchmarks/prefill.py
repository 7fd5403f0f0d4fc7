"""Prefill throughput of the engine (tokens/s), per attention path of the CPU reference.

    PYTHONPATH=. .venv/bin/python benchmarks/prefill.py [--model M] [--cases 1x128 1x512 1x1024 8x256]
        [--paths auto per-token] [--repeats 3]

Each case ``RxN`` prefills R fresh requests of N random tokens each in ONE
``Engine.step`` (one greedy ``Sample`` at each request's last token), as a
prompt's first step does. Every (case, path) is compiled and run once
untimed, then timed ``--repeats`` times, the paths interleaved; the figure is
total new tokens / median step time.

Paths: ``auto`` is the default reference attention (it picks its per-request
path for prefill shapes), ``per-token`` forces the old path that gathers the
whole K/V of its request for every token, ``by-request`` forces the new
path, ``kernel`` / ``interpret`` the Pallas kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine_jax.batch import ForwardRequest, Sample  # noqa: E402
from engine_jax.engine import Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402


def attention_for(path: str):
    from engine_jax.paged_attention import reference

    return {
        "auto": "reference",
        "per-token": reference.paged_attention_per_token,
        "by-request": reference.paged_attention_by_request,
    }.get(path, path)


def prefill_seconds(engine: Engine, num_requests: int, length: int, seed: int = 0) -> float:
    ps = engine.page_size
    rng = np.random.default_rng(seed)
    seqs = [engine.pool.alloc(-(-length // ps)) for _ in range(num_requests)]
    try:
        requests = [
            ForwardRequest(tokens=rng.integers(0, engine.config.vocab_size, length).tolist(),
                           positions=range(length), pages=pages, last_page_len=(length - 1) % ps + 1,
                           outputs=(Sample(index=length - 1),))
            for pages in seqs
        ]
        start = time.perf_counter()
        engine.step(requests)
        return time.perf_counter() - start
    finally:
        for pages in seqs:
            engine.pool.free(pages)


def parse_case(text: str) -> tuple[int, int]:
    r, n = text.lower().split("x")
    return int(r), int(n)


def main(argv: list[str] | None = None) -> None:
    from engine_jax.loader import load_model
    from engine_jax.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cases", nargs="+", default=["1x128", "1x512", "1x1024", "8x256"])
    parser.add_argument("--paths", nargs="+", default=["auto", "per-token"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)

    model = load_model(args.model)
    engines = {}
    for path in args.paths:
        # One engine per path (same weights): each path is a different static attention function.
        engines[path] = Engine(model, page_size=args.page_size, attention=attention_for(path))
    print(f"CPU: {cpu_model()}")
    print(f"model {model.name}, page size {args.page_size}, paths {args.paths}, {args.repeats} timed runs")
    results: dict[tuple[str, str], float] = {}
    for case in args.cases:
        r, n = parse_case(case)
        for path, engine in engines.items():
            start = time.perf_counter()
            prefill_seconds(engine, r, n)  # compile + warm-up
            print(f"  {case:>7} {path:>10}: first run (compile) {time.perf_counter() - start:6.1f} s", flush=True)
        times: dict[str, list[float]] = {p: [] for p in engines}
        for i in range(args.repeats):
            order = list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]
            for path, engine in order:
                times[path].append(prefill_seconds(engine, r, n, seed=i + 1))
        for path in engines:
            median = statistics.median(times[path])
            results[(case, path)] = r * n / median
            print(f"{case:>7} {path:>10}: {median * 1000:9.1f} ms  {r * n / median:8.1f} tokens/s  "
                  f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times[path])} ms)", flush=True)
    if len(args.paths) >= 2:
        a, b = args.paths[0], args.paths[1]
        for case in args.cases:
            print(f"{case:>7}: {a} / {b} = {results[(case, a)] / results[(case, b)]:.2f}x")


if __name__ == "__main__":
    main()
