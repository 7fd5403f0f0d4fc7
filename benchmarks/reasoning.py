"""Reasoning: tree-of-thought with fork sharing vs the same tree where every branch re-prefills its prefix.

Both ways run the benchmark inferlet `benchmarks/inferlets/tree_of_thought.py`
(depth `--depth`, branching `--branching`, `--thought-tokens` greedy tokens
per thought, EOS ignored) through the Host / ServingCore path `pie-run` uses,
`--trees` instances at once on the same engine:

  fork       the problem is prefilled once; children fork their parent's context
  reprefill  every node starts a fresh context and prefills its whole path again

Throughput = trees / wall time of the round. A warm-up round of each way
compiles the batch shapes; the ways are then interleaved for `--repeats`
rounds and the figures are medians.

Batches form by timing (siblings finish their prefills and thoughts at
slightly different steps from round to round), so a timed round can still
meet a new (tokens, requests, pages, outputs) bucket; JAX compiles it
(seconds on this CPU, or a load from the persistent compilation cache) on the
engine thread while every tree waits, which used to swing a round's time by
several x. That time is measured (JAX's compile events) and excluded: from
the round's wall time, and from each tree's latency where it overlaps the
tree's lifetime. Each round prints the seconds excluded.

    PYTHONPATH=. .venv/bin/python benchmarks/reasoning.py [--model M] [--depth 2] [--branching 3] [--trees 2]

On the 2-core CPU machine the defaults take ~1.5 minutes when JAX's
persistent compilation cache holds the step shapes (~1.5 s per new shape in
the process: tracing, lowering, loading) and ~2.7 when it does not (every new
shape then compiles, ~5 s each), more when other work shares the cores. More
trees add batch shapes as well as work: `--trees 4` took ~2.75 minutes with
the cache and ~7 without.

Last line: `ratio: X`, X = throughput(fork) / throughput(reprefill) (target >= 1.5).
"""

from __future__ import annotations

import argparse
import time

from common import (
    INFERLETS, CompileSpans, Server, build_inferlet, cpu_model, interleave, load_engine, median, model_arg, release_components,
)

WAYS = ("fork", "reprefill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--branching", type=int, default=3)
    parser.add_argument("--thought-tokens", type=int, default=8)
    parser.add_argument("--trees", type=int, default=2, help="concurrent tree-of-thought instances")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    compiles = CompileSpans()
    engine = load_engine(args.model)
    component = build_inferlet(INFERLETS / "tree_of_thought.py")
    server = Server(engine)
    nodes = sum(args.branching ** level for level in range(1, args.depth + 1))
    print(f"CPU: {cpu_model()}")
    print(f"model {engine.name}: {args.trees} concurrent trees, depth {args.depth}, branching {args.branching} "
          f"({nodes} thoughts of {args.thought_tokens} tokens per tree), {args.repeats} interleaved rounds", flush=True)

    results: dict[str, dict[str, list[float]]] = {w: {"tput": [], "lat": [], "prefilled": [], "steps": [],
                                                      "batch": [], "compile": []} for w in WAYS}

    def round_of(way: str, warm_up: bool = False) -> float:
        r = server.run(component, [[
            "--mode", way, "--depth", str(args.depth), "--branching", str(args.branching),
            "--thought-tokens", str(args.thought_tokens), "--problem", str(i),
        ] for i in range(args.trees)])
        end = time.time()
        start = end - r.wall
        compiled = compiles.within(start, end)
        wall = r.wall - compiled
        latencies = [lat - compiles.within(start, start + lat) for lat in r.latencies]
        counts = [dict(kv.split("=") for kv in v.split()) for v in r.values]
        if any(int(c["generated"]) != nodes * args.thought_tokens for c in counts):
            raise SystemExit(f"{way}: unexpected token counts {counts}")
        res = results[way]
        res["tput"].append(args.trees / wall)
        res["lat"].append(sum(latencies) / len(latencies))
        res["prefilled"].append(sum(int(c["prefilled"]) for c in counts) / args.trees)
        res["steps"].append(r.stats["steps"])
        res["batch"].append(r.stats["mean_batch"])
        res["compile"].append(compiled)
        print(f"  round {way}{' (warm-up)' if warm_up else ''}: {wall:.2f} s + {compiled:.2f} s compiling (excluded), "
              f"{r.stats['steps']} steps, {r.stats['tokens_processed']} tokens processed, "
              f"engine busy {r.stats['engine_seconds']:.2f} s", flush=True)
        return wall

    started = time.perf_counter()
    for way in WAYS:  # warm-up: compile the shapes each way makes
        round_of(way, warm_up=True)
    for way in WAYS:
        for v in results[way].values():
            v.clear()
    interleave({w: (lambda w=w: round_of(w)) for w in WAYS}, args.repeats)
    print(f"warm-up and timed rounds took {time.perf_counter() - started:.0f} s")

    for way in WAYS:
        res = results[way]
        print(f"{way:>9}: {median(res['tput']):6.3f} trees/s, mean latency {median(res['lat']):6.2f} s, "
              f"{median(res['prefilled']):5.0f} prompt tokens prefilled per tree, {median(res['steps']):4.0f} engine steps, "
              f"mean batch {median(res['batch']):4.1f}  [per round: {', '.join(f'{x:.3f}' for x in res['tput'])}; "
              f"compiling excluded: {', '.join(f'{x:.1f} s' for x in res['compile'])}]")
    server.stop()
    del component
    release_components()
    print(f"ratio: {median(results['fork']['tput']) / median(results['reprefill']['tput']):.2f}")


if __name__ == "__main__":
    main()
