"""Benchmark inferlet: a ReAct-style agent loop with deterministic stand-in tools.

The prompt is a long tool-description prefix plus a question. Each of the
`tool-calls` steps generates exactly `gen-tokens` tokens (the "action",
greedy, EOS ignored), then runs the tool inside the inferlet (a fixed string
computed from the agent and step numbers) and appends its observation.

Modes (what the agentic benchmark compares):
  stateless      every step starts a fresh context and re-sends the whole
                 conversation (what a client of a prompt-in/tokens-out server does)
  cached         one context for the whole loop: the KV cache survives tool calls
  prefix         like cached, but the tool-description prefix is imported
                 (zero-copy) from an export made once by `export-prefix`
  export-prefix  prefill the prefix once and export it (persistent) under `prefix-name`
  unexport       withdraw that export

Returns "prefilled=<tokens run as prompt> generated=<tokens generated>".
"""

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="bench-react-agent",
    version="0.1.0",
    description="ReAct agent benchmark: stateless vs KV kept across tool calls vs shared exported prefix.",
    arguments=[
        inferlet.Arg("mode", str, default="cached", help="stateless | cached | prefix | export-prefix | unexport"),
        inferlet.Arg("agent", int, default=0, help="Agent number (varies the question and tool results)."),
        inferlet.Arg("tool-calls", int, default=8, help="Tool calls (= generation steps) per agent."),
        inferlet.Arg("gen-tokens", int, default=4, help="Tokens generated per step."),
        inferlet.Arg("tools", int, default=8, help="Tool descriptions in the prefix (its length)."),
        inferlet.Arg("prefix-name", str, default="bench-react-tools", help="Export name of the prefix."),
    ],
)

_TOOL_VERBS = ["search", "lookup", "compute", "translate", "summarize", "fetch", "compare", "convert"]


def tool_prefix(tools: int) -> str:
    lines = [
        "You are a careful assistant that answers questions by calling tools.",
        "Use the format: Thought, Action, Observation, repeated, then Answer.",
        "Available tools:",
    ]
    for i in range(tools):
        verb = _TOOL_VERBS[i % len(_TOOL_VERBS)]
        lines.append(
            f"- {verb}_{i}(query: str) -> str: {verb}s the query against data source number {i} "
            f"and returns a short plain-text result."
        )
    return "\n".join(lines) + "\n"


def question(agent: int) -> str:
    return f"Question: what is the combined value of item {agent} and item {agent + 7}?\nThought:"


def observation(agent: int, step: int, tools: int) -> str:
    verb = _TOOL_VERBS[step % len(_TOOL_VERBS)]
    value = (agent * 7919 + step * 104729) % 1000
    return f"\nObservation: {verb}_{step % tools} returned {value}.\nThought:"


def main(args) -> str:
    model = inferlet.get_model()
    greedy = Sampler.greedy()
    stop = Stop(max_tokens=args.gen_tokens, eos=False)
    prefilled = 0
    generated = 0

    if args.mode == "export-prefix":
        ctx = Context(model)
        ctx.fill(tool_prefix(args.tools))
        prefilled = len(ctx.pending)
        ctx.export(args.prefix_name, persistent=True)
        # Wait until the export is published: commands still queued when the
        # instance returns are cancelled with it.
        ctx.synchronize()
        ctx.release()
        return f"prefilled={prefilled} generated=0"
    if args.mode == "unexport":
        ctx = Context(model)
        ctx.unexport(args.prefix_name)
        ctx.release()
        return "prefilled=0 generated=0"

    if args.mode == "stateless":
        conversation = tool_prefix(args.tools) + question(args.agent)
        for step in range(args.tool_calls):
            ctx = Context(model)
            ctx.fill(conversation)
            prefilled += len(ctx.pending)
            text = ctx.generate(greedy, stop)
            generated += len(ctx.generated)
            ctx.release()
            conversation += text + observation(args.agent, step, args.tools)
        return f"prefilled={prefilled} generated={generated}"

    if args.mode == "cached":
        ctx = Context(model)
        ctx.fill(tool_prefix(args.tools))
    elif args.mode == "prefix":
        ctx = Context.import_(model, args.prefix_name)
    else:
        raise ValueError(f"unknown mode {args.mode!r}")
    ctx.fill(question(args.agent))
    for step in range(args.tool_calls):
        prefilled += len(ctx.pending)
        ctx.generate(greedy, stop)
        generated += len(ctx.generated)
        ctx.fill(observation(args.agent, step, args.tools))
    ctx.release()
    return f"prefilled={prefilled} generated={generated}"
