"""Recursion of thought: split a problem into subproblems, solve each in its own context.

A node writes `branching` subproblems of its problem, solves each one
recursively in a fresh context (a short context of its own, not the
parent's whole history), then reads the answers back and writes its own.
Sibling subproblems are solved concurrently with `asyncio.gather`, so at
every level the server batches their passes. At `depth` 0 a node answers
directly.

Returns JSON: the root node, recursively {"problem", "subproblems": [node],
"answer"}, where texts are token lists.
"""

import asyncio
import json

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="recursion-of-thought",
    version="0.1.0",
    description="Solves a problem by recursively solving generated subproblems in separate contexts.",
    arguments=[
        inferlet.Arg("problem", str, default="Plan a three-day trip to Rome.", help="The problem."),
        inferlet.Arg("depth", int, default=2, help="Levels of subproblems."),
        inferlet.Arg("branching", int, default=2, help="Subproblems per problem."),
        inferlet.Arg("sub-tokens", int, default=12, help="Most tokens per subproblem statement."),
        inferlet.Arg("answer-tokens", int, default=24, help="Most tokens per answer."),
    ],
)


async def solve(problem: list, depth: int, args) -> dict:
    greedy = Sampler.greedy()
    ctx = Context(inferlet.get_model())
    ctx.fill("Problem:")
    ctx.fill_tokens(problem)
    subproblems = []
    if depth > 0:
        ctx.fill("\nSubproblems:")
        statements = []
        for i in range(1, args.branching + 1):
            ctx.fill(f"\n{i}.")
            await ctx.generate_async(greedy, Stop(max_tokens=args.sub_tokens))
            statements.append(ctx.generated)
        subproblems = await asyncio.gather(*(solve(s, depth - 1, args) for s in statements))
        for i, sub in enumerate(subproblems, start=1):
            ctx.fill(f"\nAnswer {i}:")
            ctx.fill_tokens(sub["answer"])
    ctx.fill("\nAnswer:")
    await ctx.generate_async(greedy, Stop(max_tokens=args.answer_tokens))
    node = {"problem": problem, "subproblems": list(subproblems), "answer": ctx.generated}
    ctx.release()
    return node


async def main(args) -> str:
    problem = inferlet.get_model().tokenizer.encode(args.problem)
    return json.dumps(await solve(problem, args.depth, args))
