"""ReAct agent: Thought -> Action -> Observation loops, with the tools run in the inferlet.

The whole episode lives in one Context, so each step only prefills what is
new (the action line and the tool's observation): nothing is re-sent or
recomputed between tool calls, unlike a client-side agent loop.

Tools:
  calculator[EXPR]  arithmetic (+ - * / ** and parentheses), evaluated safely
  lookup[KEY]       a fact from the key-value store (seeded with --facts)

Normally the model writes each action line itself; `--actions` forces the
given lines instead (one per step, separated by '|'), which drives a random
test model through the real loop: the line is still parsed, the tool still
runs, and the model still writes every thought and the final answer.

Returns JSON: {"answer", "answer_tokens", "steps": [{"thought_tokens",
"action", "observation", "prefilled", "context"}], "final": {"prefilled",
"context"}} where "prefilled" is how many tokens a generation ran through
the model before its first token and "context" the sequence length then.
"""

import ast
import json
import operator
import re

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="agent-react",
    version="0.1.0",
    description="A ReAct agent with a calculator and a key-value lookup tool.",
    arguments=[
        inferlet.Arg("question", str, default="What is 6 times 7?", help="The task."),
        inferlet.Arg("actions", str, default="", help="Force these action lines ('|'-separated) instead."),
        inferlet.Arg("facts", str, default="capital of France=Paris",
                     help="KEY=VALUE pairs (';'-separated) to put in the store for lookup."),
        inferlet.Arg("max-steps", int, default=4, help="Most tool calls."),
        inferlet.Arg("thought-tokens", int, default=24, help="Most tokens per thought."),
        inferlet.Arg("answer-tokens", int, default=32, help="Most tokens of the final answer."),
    ],
)

HEADER = ("Answer the question. Use the tools calculator[EXPR] and lookup[KEY].\n"
          "Format: Thought: ... Action: tool[input] Observation: ... Final Answer: ...\n")
FACTS_PREFIX = "agent-react/facts/"
ACTION_RE = re.compile(r"(\w+)\[(.*)\]")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expr: str) -> str:
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("not arithmetic")

    try:
        return str(value(ast.parse(expr, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as err:
        return f"error: {err}"


def lookup(key: str) -> str:
    found = inferlet.store.get(FACTS_PREFIX + key.strip())
    return found if found is not None else "unknown"


TOOLS = {"calculator": calculate, "lookup": lookup}


def run_tool(line: str) -> str:
    """Parses `tool[input]` out of an action line and runs the tool."""
    match = ACTION_RE.search(line)
    if not match or match.group(1) not in TOOLS:
        return f"error: no tool call in {line!r}"
    return TOOLS[match.group(1)](match.group(2))


def main(args) -> str:
    for pair in filter(None, args.facts.split(";")):
        key, _, value = pair.partition("=")
        inferlet.store.set(FACTS_PREFIX + key.strip(), value.strip())
    forced = [a for a in args.actions.split("|") if a] if args.actions else None
    greedy = Sampler.greedy()

    ctx = Context(inferlet.get_model())
    ctx.fill(f"{HEADER}Question: {args.question}")
    steps = []
    for step in range(args.max_steps if forced is None else len(forced)):
        ctx.fill("\nThought:")
        # What this step runs through the model: the previous action and
        # observation (and this header); the KV before it is reused as is.
        prefilled, context = len(ctx.pending), ctx.kv_len + len(ctx.pending)
        thought = ctx.generate(greedy, Stop(max_tokens=args.thought_tokens, strings=["\nAction:"]))
        record = {"thought_tokens": ctx.generated, "prefilled": prefilled, "context": context}
        if forced is None:
            if "Final Answer" in thought:
                break
            ctx.fill("\nAction:")
            action = ctx.generate(greedy, Stop(max_tokens=32, strings=["\n"])).strip()
        else:
            action = forced[step]
            ctx.fill(f"\nAction: {action}")
        observation = run_tool(action)  # the tool runs here, next to the KV cache
        ctx.fill(f"\nObservation: {observation}")
        steps.append({**record, "action": action, "observation": observation})

    ctx.fill("\nFinal Answer:")
    prefilled, context = len(ctx.pending), ctx.kv_len + len(ctx.pending)
    answer = ctx.generate(greedy, Stop(max_tokens=args.answer_tokens))
    result = {"answer": answer, "answer_tokens": ctx.generated, "steps": steps,
              "final": {"prefilled": prefilled, "context": context}}
    ctx.release()
    return json.dumps(result)
