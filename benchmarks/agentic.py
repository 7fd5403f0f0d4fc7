"""Agentic workflow: 16 concurrent ReAct agents (8 tool calls each, a long tool-description prefix), three ways.

All three run the benchmark inferlet `benchmarks/inferlets/react_agent.py`
through the Host / ServingCore path `pie-run` uses, on the same engine:

  (a) stateless  every step re-sends the whole conversation as a new prompt
  (b) cached     each agent keeps its KV cache across tool calls
  (c) prefix     (b) + the tool-description prefix exported once (one extra
                 instance, counted in the round's time) and imported by every agent

Tools are deterministic stand-ins run inside the inferlet; every step
generates exactly `--gen-tokens` tokens (greedy, EOS ignored). For each way:
agents/s (agents / wall time of the round) and mean agent latency (launch to
return). A warm-up round of each way compiles the batch shapes; then the ways
are interleaved for `--repeats` rounds and the figures are medians.

    PYTHONPATH=. .venv/bin/python benchmarks/agentic.py [--model M] [--agents 4] [--tool-calls 4]

The paper's shape is `--agents 16 --tool-calls 8`; on the 2-core CPU
machine the stateless way alone then re-prefills ~40K tokens per round
(the CPU reference attention prefills at ~100-500 tokens/s), far past the
5-minute budget, so the defaults are 4 agents x 4 tool calls.

Last line: `ratio: X`, X = throughput (c) / throughput (a) (target >= 3).
"""

from __future__ import annotations

import argparse

from common import INFERLETS, Server, build_inferlet, interleave, load_engine, median, model_arg, release_components

WAYS = ("stateless", "cached", "prefix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--tool-calls", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=4)
    parser.add_argument("--tools", type=int, default=8, help="tool descriptions in the prefix (its length)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kv-pages", type=int, default=1024)
    args = parser.parse_args()

    engine = load_engine(args.model, num_pages=args.kv_pages)
    component = build_inferlet(INFERLETS / "react_agent.py")
    server = Server(engine)
    common_args = ["--tool-calls", str(args.tool_calls), "--gen-tokens", str(args.gen_tokens),
                   "--tools", str(args.tools)]
    print(f"model {engine.name}: {args.agents} agents x {args.tool_calls} tool calls, {args.gen_tokens} tokens "
          f"generated per step, {args.tools} tool descriptions in the prefix, {args.repeats} interleaved rounds")

    results: dict[str, dict[str, list[float]]] = {w: {"tput": [], "lat": [], "prefilled": [], "steps": []} for w in WAYS}
    rounds = {"n": 0, "prefix_tokens": 0}

    def round_of(way: str) -> float:
        agents = [["--mode", way, "--agent", str(i), *common_args] for i in range(args.agents)]
        wall = 0.0
        if way == "prefix":
            name = f"bench-react-tools-{rounds['n']}"
            rounds["n"] += 1
            agents = [a + ["--prefix-name", name] for a in agents]
            export = server.run(component, [["--mode", "export-prefix", "--prefix-name", name, *common_args]])
            wall += export.wall
            rounds["prefix_tokens"] = int(export.values[0].split()[0].split("=")[1])
        r = server.run(component, agents)
        wall += r.wall
        if way == "prefix":
            server.run(component, [["--mode", "unexport", "--prefix-name", name]])
        expected = args.tool_calls * args.gen_tokens
        counts = [dict(kv.split("=") for kv in v.split()) for v in r.values]
        if any(int(c["generated"]) != expected for c in counts):
            raise SystemExit(f"{way}: an agent generated {counts} tokens, expected {expected} each")
        results[way]["tput"].append(args.agents / wall)
        results[way]["lat"].append(sum(r.latencies) / len(r.latencies))
        results[way]["prefilled"].append(sum(int(c["prefilled"]) for c in counts) / args.agents)
        results[way]["steps"].append(r.stats["steps"])
        print(f"  round {way}: {wall:.2f} s, {r.stats['steps']} steps, {r.stats['tokens_processed']} tokens processed, "
              f"engine busy {r.stats['engine_seconds']:.2f} s", flush=True)
        return wall

    for way in WAYS:  # warm-up: compile the shapes each way makes
        round_of(way)
    for way in WAYS:
        for v in results[way].values():
            v.clear()
    interleave({w: (lambda w=w: round_of(w)) for w in WAYS}, args.repeats)

    print(f"tool-description prefix: {rounds['prefix_tokens']} tokens")
    for label, way in zip("abc", WAYS):
        res = results[way]
        print(f"({label}) {way:>9}: {median(res['tput']):6.3f} agents/s, mean latency {median(res['lat']):7.2f} s, "
              f"{median(res['prefilled']):6.0f} prompt tokens prefilled per agent, {median(res['steps']):4.0f} engine steps"
              f"  [throughput per round: {', '.join(f'{x:.3f}' for x in res['tput'])}]")
    base = median(results["stateless"]["tput"])
    print(f"throughput vs (a): (b) x{median(results['cached']['tput']) / base:.2f}, "
          f"(c) x{median(results['prefix']['tput']) / base:.2f}")
    server.stop()
    del component
    release_components()
    print(f"ratio: {median(results['prefix']['tput']) / base:.2f}")


if __name__ == "__main__":
    main()
