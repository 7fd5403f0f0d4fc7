"""Memory pressure benchmark: 2x KV oversubscription vs a pool big enough for all, and the cost of clearing reused pages.

Part 1. N concurrent greedy generations (one thread each, through the serving
core: prefill, then one decode forward per token, pages allocated as the
sequence grows) run twice per repeat on the same engine: once with room for
all of them, once with their namespace's quota at half their total KV demand
(`TenantLimits(namespace_pages=...)`), so they wait for pages and the server
preempts (pages to host memory and back). Both arms must produce the same
tokens. Printed: throughput (tokens/s), p99 latency per generation,
preemptions and time paused; the ratios pressured / unpressured. Time spent
compiling a batch shape met for the first time is taken out of both (the
arms meet different batch mixes; compilation is not what is measured).

Part 2. A reused page is cleared (K, V and valid bits zeroed) before its
first use (engine_jax.kv_cache). The cost is measured on decode steps of
`--batch` requests where every request's last page is freshly allocated
before every step (the worst case: a sequence only gets a fresh page once
every page-size tokens), against the same steps clearing only the valid bits
(what the engine did before; unsafe). The amortised cost of a real decode is
the worst case divided by the page size.

    python benchmarks/oversubscription.py [--model M] [--generations 32] [--new-tokens 48]

The last line is `ratio: X`, pressured / unpressured throughput.
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from typing import Any, Sequence

import common
from batching_policy import PROMPTS, complete

COMPILES = common.CompileSpans()


def generate(core: Any, name: str, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], float]:
    """One greedy generation through the serving core (batching_policy.complete: prefill, then a
    forward per token, pages allocated as it grows); (tokens, seconds without XLA compilation)."""
    started = time.time()
    tokens = complete(core, name, prompt, new_tokens)
    ended = time.time()
    return tokens, ended - started - COMPILES.within(started, ended)


def run_round(engine: Any, prompts: list[list[int]], new_tokens: int, namespace_pages: int | None) -> dict:
    from pie_runtime import ServingCore
    from pie_runtime.limits import TenantLimits

    core = ServingCore(engine, limits=TenantLimits(namespace_pages=namespace_pages)).start()
    results: list[Any] = [None] * len(prompts)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = generate(core, f"gen-{i}", prompts[i], new_tokens)
        except BaseException as exc:  # noqa: BLE001 - reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = time.time()
    compiling = COMPILES.within(started, ended)  # a batch shape seen the first time: not what is measured
    wall = ended - started - compiling
    stats = core.stats
    core.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} generations failed, first: {errors[0]!r}")
    latencies = sorted(seconds for _, seconds in results)
    return {
        "tokens": [tokens for tokens, _ in results],
        "throughput": len(prompts) * new_tokens / wall,
        "p99": latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)],
        "wall": wall,
        "compiling": compiling,
        "stats": stats,
    }


def pages_needed(prompts: list[list[int]], new_tokens: int, page_size: int) -> int:
    return sum(math.ceil((len(p) + new_tokens - 1) / page_size) for p in prompts)


def oversubscription(engine: Any, args: argparse.Namespace) -> float:
    texts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.generations)]
    prompts = [list(engine.tokenizer.encode(t)) for t in texts]
    demand = pages_needed(prompts, args.new_tokens, engine.page_size)
    half = demand // 2
    if demand > engine.num_pages:
        raise SystemExit(f"the pool has {engine.num_pages} pages; the unpressured arm needs {demand}")
    print(f"part 1: {args.generations} generations x {args.new_tokens} tokens, KV demand {demand} pages; "
          f"pressured arm: namespace quota {half} pages (2x oversubscribed)")
    arms = {"unpressured": None, "pressured": half}
    for quota in arms.values():  # untimed: compiles the step shapes both arms meet
        run_round(engine, prompts, args.new_tokens, quota)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(args.repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            runs[name].append(run_round(engine, prompts, args.new_tokens, arms[name]))
    reference = runs["unpressured"][0]["tokens"]
    for name, rounds in runs.items():
        for result in rounds:
            if result["tokens"] != reference:
                raise SystemExit(f"{name}: the tokens differ from the unpressured run")
    for name, rounds in runs.items():
        s = [r["stats"] for r in rounds]
        print(f"{name:>12}: {statistics.median(r['throughput'] for r in rounds):7.1f} tok/s  "
              f"p99 {statistics.median(r['p99'] for r in rounds):6.2f} s  "
              f"preemptions {statistics.median(x.preemptions for x in s):5.0f} "
              f"({statistics.median(x.pages_preempted for x in s):.0f} pages)  "
              f"paused {statistics.median(x.paused_seconds for x in s):6.2f} s  "
              f"waits {statistics.median(x.alloc_waits for x in s):4.0f}  steps {statistics.median(x.steps for x in s):.0f}  "
              f"compiling {sum(r['compiling'] for r in rounds):.1f} s (taken out)")
    ratios = [p["throughput"] / u["throughput"] for p, u in zip(runs["pressured"], runs["unpressured"])]
    p99 = [p["p99"] / u["p99"] for p, u in zip(runs["pressured"], runs["unpressured"])]
    print(f"pressured / unpressured: throughput {statistics.median(ratios):.3f} "
          f"(per repeat {', '.join(f'{x:.3f}' for x in ratios)}), p99 latency {statistics.median(p99):.3f}; "
          "tokens identical in every run")
    return statistics.median(ratios)


def clearing_cost(engine: Any, args: argparse.Namespace) -> None:
    import jax
    import numpy as np

    import engine_jax.engine as engine_module
    from engine_jax.batch import ForwardRequest, Sample
    from engine_jax.kv_cache import KVCache

    def valid_bits_only(cache, pages):
        return KVCache(k=cache.k, v=cache.v, slot_valid=cache.slot_valid.at[pages].set(False, mode="drop"))

    clears = {"clear K, V, valid": engine_module.clear_pages,
              "valid bits only": jax.jit(valid_bits_only, donate_argnums=(0,))}
    ps, batch, context = engine.page_size, args.batch, args.context
    per_request = math.ceil((context + 1) / ps)
    pages = [list(engine.pool.alloc(per_request)) for _ in range(batch)]
    ids = engine.tokenizer.encode(PROMPTS[0])
    fill = [(ids * (context // len(ids) + 1))[:context] for _ in range(batch)]
    engine.step([ForwardRequest(tokens=f, positions=list(range(context)), pages=p[:math.ceil(context / ps)],
                                last_page_len=(context - 1) % ps + 1) for f, p in zip(fill, pages)])

    def decode_step() -> float:
        for p in pages:  # the last page of every sequence is fresh for this step
            engine.pool.free([p[-1]])
            p[-1] = engine.pool.alloc(1)[0]
        requests = [ForwardRequest(tokens=[7], positions=[context], pages=p, last_page_len=(context % ps) + 1,
                                   outputs=[Sample(0)]) for p in pages]
        started = time.perf_counter()
        engine.step(requests)
        return time.perf_counter() - started

    # The clearing op alone, on `batch` pages (both variants run in place on the donated pool).
    op: dict[str, list[float]] = {name: [] for name in clears}
    ids = np.arange(batch, dtype=np.int32)
    for r in range(2 * args.repeats + 1):
        for name in (list(clears) if r % 2 == 0 else list(clears)[::-1]):
            for _ in range(args.steps):
                started = time.perf_counter()
                engine.cache = jax.block_until_ready(clears[name](engine.cache, ids))
                if r:
                    op[name].append(time.perf_counter() - started)
    op_cost = statistics.median(op["clear K, V, valid"]) - statistics.median(op["valid bits only"])

    samples: dict[str, list[float]] = {name: [] for name in clears}
    for r in range(args.repeats * 2 + 1):
        for name in (list(clears) if r % 2 == 0 else list(clears)[::-1]):
            engine_module.clear_pages = clears[name]
            times = [decode_step() for _ in range(args.steps)]
            if r:  # the first round compiles
                samples[name].extend(times)
    engine_module.clear_pages = clears["clear K, V, valid"]
    for p in pages:
        engine.pool.free(p)
    med = {name: statistics.median(v) for name, v in samples.items()}
    worst = med["clear K, V, valid"] / med["valid bits only"]
    print(f"part 2: decode steps of {batch} requests at {context} tokens of context, {batch} fresh pages per step")
    for name, value in med.items():
        print(f"{name:>18}: {value * 1000:7.2f} ms per step (median of {len(samples[name])}); "
              f"the clearing op alone {statistics.median(op[name]) * 1000:.3f} ms")
    print(f"clearing {batch} pages costs {op_cost * 1000:.3f} ms more than clearing their valid bits: "
          f"{100 * op_cost / med['valid bits only']:+.2f}% of a step that gets them all, "
          f"{100 * op_cost / med['valid bits only'] / ps:+.2f}% amortised over a decode (a fresh page every {ps} tokens)")
    print(f"decode steps measured whole: worst case (every step) {100 * (worst - 1):+.2f}%, "
          f"amortised {100 * (worst - 1) / ps:+.2f}%")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.model_arg(parser)
    parser.add_argument("--generations", type=int, default=32, help="concurrent generations (part 1)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens each generation draws")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each arm")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="decode batch of part 2")
    parser.add_argument("--context", type=int, default=256, help="tokens of context per request in part 2")
    parser.add_argument("--steps", type=int, default=10, help="decode steps per arm and repeat in part 2")
    parser.add_argument("--skip-part-1", action="store_true")
    args = parser.parse_args(argv)
    print(f"CPU: {common.cpu_model()}")
    engine = common.load_engine(args.model, page_size=args.page_size)
    print(f"model {engine.name}, pool {engine.num_pages} pages of {engine.page_size} slots, {engine.platform}")
    clearing_cost(engine, args)
    if not args.skip_part_1:
        ratio = oversubscription(engine, args)
        print(f"ratio: {ratio:.3f}")
    common.release_components()


if __name__ == "__main__":
    main()
