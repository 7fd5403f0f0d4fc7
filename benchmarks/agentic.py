"""Agentic workflow: 16 concurrent ReAct agents (tool calls after a long tool-description prefix), three ways.

All three run the benchmark inferlet `benchmarks/inferlets/react_agent.py`
through the Host / ServingCore path `pie-run` uses, on the same engine:

  (a) stateless  every step re-sends the whole conversation as a new prompt
  (b) cached     each agent keeps its KV cache across tool calls
  (c) prefix     (b) + the tool-description prefix exported once (one extra
                 instance, counted in the round's time) and imported by every agent

Tools are deterministic stand-ins run inside the inferlet; every step
generates exactly `--gen-tokens` tokens (greedy, EOS ignored). For each way:
agents/s (agents / wall time of the round) and mean agent latency (launch to
return). A warm-up round of each way (same agents, only
`--warmup-tool-calls` tool calls: the first steps, where all agents prefill
at once and the batches are largest, at a fraction of a full round's cost)
compiles most batch shapes; then the ways are interleaved for `--repeats`
rounds and the figures are medians.

Batches form by timing, so a timed round can still meet a new (tokens,
requests, pages, outputs) bucket; JAX compiles it (seconds on this CPU, or a
load from the persistent compilation cache) on the engine thread while every
agent waits. That time is measured (JAX's compile events) and excluded: from
the round's wall time, and from each agent's latency where it overlaps the
agent's lifetime. Each round prints the seconds excluded.

    PYTHONPATH=. .venv/bin/python benchmarks/agentic.py [--model M] [--agents 16] [--tool-calls 8]

The default is the paper's shape, 16 agents x 8 tool calls. On the 2-core CPU
machine its stateless way alone re-prefills ~49K prompt tokens per round;
the whole script took 3.8 minutes there on a quiet machine (2026-11-25, after
decode runs cut the inferlets' per-token overhead), and would take longer
with other work on the cores. `--tool-calls 4` halves the stateless way's
prefill (~22K tokens) and takes ~2.5 minutes.

Last line: `ratio: X`, X = throughput (c) / throughput (a) (target >= 3).
"""

from __future__ import annotations

import argparse
import time

from common import (
    INFERLETS, CompileSpans, Server, build_inferlet, cpu_model, interleave, load_engine, median, model_arg, release_components,
)

WAYS = ("stateless", "cached", "prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--tool-calls", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=4)
    parser.add_argument("--tools", type=int, default=8, help="tool descriptions in the prefix (its length)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warmup-tool-calls", type=int, default=2,
                        help="tool calls per agent in the warm-up round of each way (at most --tool-calls)")
    parser.add_argument("--kv-pages", type=int, default=1024)
    args = parser.parse_args()

    compiles = CompileSpans()
    engine = load_engine(args.model, num_pages=args.kv_pages)
    component = build_inferlet(INFERLETS / "react_agent.py")
    server = Server(engine)
    print(f"CPU: {cpu_model()}")
    print(f"model {engine.name}: {args.agents} agents x {args.tool_calls} tool calls, {args.gen_tokens} tokens "
          f"generated per step, {args.tools} tool descriptions in the prefix, {args.repeats} interleaved rounds "
          f"after a warm-up round of each way with {min(args.warmup_tool_calls, args.tool_calls)} tool calls",
          flush=True)

    results: dict[str, dict[str, list[float]]] = {
        w: {"tput": [], "lat": [], "prefilled": [], "steps": [], "compile": []} for w in WAYS}
    rounds = {"n": 0, "prefix_tokens": 0}

    def run(argument_sets: list[list[str]]):
        """One `Server.run`; its wall time and latencies without the compilation that overlapped them."""
        r = server.run(component, argument_sets)
        end = time.time()
        start = end - r.wall
        compiled = compiles.within(start, end)
        latencies = [lat - compiles.within(start, start + lat) for lat in r.latencies]
        return r, r.wall - compiled, latencies, compiled

    def round_of(way: str, tool_calls: int, warm_up: bool = False) -> float:
        common_args = ["--tool-calls", str(tool_calls), "--gen-tokens", str(args.gen_tokens),
                       "--tools", str(args.tools)]
        agents = [["--mode", way, "--agent", str(i), *common_args] for i in range(args.agents)]
        wall = compiled = 0.0
        if way == "prefix":
            name = f"bench-react-tools-{rounds['n']}"
            rounds["n"] += 1
            agents = [a + ["--prefix-name", name] for a in agents]
            export, export_wall, _, export_compiled = run(
                [["--mode", "export-prefix", "--prefix-name", name, *common_args]])
            wall += export_wall
            compiled += export_compiled
            rounds["prefix_tokens"] = int(export.values[0].split()[0].split("=")[1])
        r, agents_wall, latencies, agents_compiled = run(agents)
        wall += agents_wall
        compiled += agents_compiled
        if way == "prefix":
            server.run(component, [["--mode", "unexport", "--prefix-name", name]])
        expected = tool_calls * args.gen_tokens
        counts = [dict(kv.split("=") for kv in v.split()) for v in r.values]
        if any(int(c["generated"]) != expected for c in counts):
            raise SystemExit(f"{way}: an agent generated {counts} tokens, expected {expected} each")
        results[way]["tput"].append(args.agents / wall)
        results[way]["lat"].append(sum(latencies) / len(latencies))
        results[way]["prefilled"].append(sum(int(c["prefilled"]) for c in counts) / args.agents)
        results[way]["steps"].append(r.stats["steps"])
        results[way]["compile"].append(compiled)
        print(f"  round {way}{' (warm-up)' if warm_up else ''}: {wall:.2f} s "
              f"+ {compiled:.2f} s compiling (excluded), {r.stats['steps']} steps, "
              f"{r.stats['tokens_processed']} tokens processed, engine busy {r.stats['engine_seconds']:.2f} s",
              flush=True)
        return wall

    started = time.perf_counter()
    for way in WAYS:  # warm-up: compile the shapes each way makes
        round_of(way, min(args.warmup_tool_calls, args.tool_calls), warm_up=True)
    for way in WAYS:
        for v in results[way].values():
            v.clear()
    interleave({w: (lambda w=w: round_of(w, args.tool_calls)) for w in WAYS}, args.repeats)

    print(f"tool-description prefix: {rounds['prefix_tokens']} tokens; "
          f"warm-up and timed rounds took {time.perf_counter() - started:.0f} s")
    for label, way in zip("abc", WAYS):
        res = results[way]
        print(f"({label}) {way:>9}: {median(res['tput']):6.3f} agents/s, mean latency {median(res['lat']):7.2f} s, "
              f"{median(res['prefilled']):6.0f} prompt tokens prefilled per agent, {median(res['steps']):4.0f} engine steps"
              f"  [throughput per round: {', '.join(f'{x:.3f}' for x in res['tput'])}; "
              f"compiling excluded: {', '.join(f'{x:.1f} s' for x in res['compile'])}]")
    base = median(results["stateless"]["tput"])
    print(f"throughput vs (a): (b) x{median(results['cached']['tput']) / base:.2f}, "
          f"(c) x{median(results['prefix']['tput']) / base:.2f}")
    server.stop()
    del component
    release_components()
    print(f"ratio: {median(results['prefix']['tput']) / base:.2f}")


if __name__ == "__main__":
    main()
