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

    PYTHONPATH=. .venv/bin/python benchmarks/reasoning.py [--model M] [--depth 2] [--branching 3] [--trees 2]

Last line: `ratio: X`, X = throughput(fork) / throughput(reprefill) (target >= 1.5).
"""

from __future__ import annotations

import argparse

from common import INFERLETS, Server, build_inferlet, interleave, load_engine, median, model_arg, release_components

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

    engine = load_engine(args.model)
    component = build_inferlet(INFERLETS / "tree_of_thought.py")
    server = Server(engine)
    nodes = sum(args.branching ** level for level in range(1, args.depth + 1))
    print(f"model {engine.name}: {args.trees} concurrent trees, depth {args.depth}, branching {args.branching} "
          f"({nodes} thoughts of {args.thought_tokens} tokens per tree), {args.repeats} interleaved rounds")

    results: dict[str, dict[str, list[float]]] = {w: {"tput": [], "lat": [], "prefilled": [], "steps": [],
                                                      "batch": []} for w in WAYS}

    def round_of(way: str) -> float:
        r = server.run(component, [[
            "--mode", way, "--depth", str(args.depth), "--branching", str(args.branching),
            "--thought-tokens", str(args.thought_tokens), "--problem", str(i),
        ] for i in range(args.trees)])
        counts = [dict(kv.split("=") for kv in v.split()) for v in r.values]
        if any(int(c["generated"]) != nodes * args.thought_tokens for c in counts):
            raise SystemExit(f"{way}: unexpected token counts {counts}")
        res = results[way]
        res["tput"].append(args.trees / r.wall)
        res["lat"].append(sum(r.latencies) / len(r.latencies))
        res["prefilled"].append(sum(int(c["prefilled"]) for c in counts) / args.trees)
        res["steps"].append(r.stats["steps"])
        res["batch"].append(r.stats["mean_batch"])
        print(f"  round {way}: {r.wall:.2f} s, {r.stats['steps']} steps, {r.stats['tokens_processed']} tokens processed, "
              f"engine busy {r.stats['engine_seconds']:.2f} s", flush=True)
        return r.wall

    for way in WAYS:  # warm-up: compile the shapes each way makes
        round_of(way)
    for way in WAYS:
        for v in results[way].values():
            v.clear()
    interleave({w: (lambda w=w: round_of(w)) for w in WAYS}, args.repeats)

    for way in WAYS:
        res = results[way]
        print(f"{way:>9}: {median(res['tput']):6.3f} trees/s, mean latency {median(res['lat']):6.2f} s, "
              f"{median(res['prefilled']):5.0f} prompt tokens prefilled per tree, {median(res['steps']):4.0f} engine steps, "
              f"mean batch {median(res['batch']):4.1f}  [per round: {', '.join(f'{x:.3f}' for x in res['tput'])}]")
    server.stop()
    del component
    release_components()
    print(f"ratio: {median(results['fork']['tput']) / median(results['reprefill']['tput']):.2f}")


if __name__ == "__main__":
    main()
