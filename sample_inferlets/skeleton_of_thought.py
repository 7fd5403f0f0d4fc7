"""Skeleton of thought: write an outline first, then expand its points in parallel.

Phase 1 generates a skeleton of `points` short points in one context.
Phase 2 forks that context once per point (the forks share the skeleton's
KV pages) and expands every point concurrently with `asyncio.gather`: the
server batches the forks' decode steps into shared forward passes, so the
expansions cost about as many engine steps as one of them.

Returns JSON: {"skeleton": [{"text", "tokens"}], "points": [{"text", "tokens"}]}; the
expansion of point i continues the skeleton followed by "\\nPoint {i}:".
"""

import asyncio
import json

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="skeleton-of-thought",
    version="0.1.0",
    description="Outlines an answer, then expands every point in parallel forks.",
    arguments=[
        inferlet.Arg("question", str, default="How do I make my code faster?", help="The question."),
        inferlet.Arg("points", int, default=3, help="Points in the skeleton."),
        inferlet.Arg("skeleton-tokens", int, default=8, help="Most tokens per skeleton point."),
        inferlet.Arg("point-tokens", int, default=32, help="Most tokens per expanded point."),
    ],
)


async def expand(skeleton: Context, i: int, max_tokens: int) -> dict:
    ctx = await skeleton.fork_async()
    ctx.fill(f"\nPoint {i}:")
    text = await ctx.generate_async(Sampler.greedy(), Stop(max_tokens=max_tokens))
    point = {"text": text, "tokens": ctx.generated}
    ctx.release()
    return point


async def main(args) -> str:
    ctx = Context(inferlet.get_model())
    ctx.fill(f"Question: {args.question}\nSkeleton:")
    skeleton = []
    for i in range(1, args.points + 1):
        ctx.fill(f"\n{i}.")
        text = ctx.generate(Sampler.greedy(), Stop(max_tokens=args.skeleton_tokens))
        skeleton.append({"text": text, "tokens": ctx.generated})
    ctx.fill("\nExpansion:")
    await ctx.flush_async()  # the shared part goes through the model once

    points = await asyncio.gather(*(expand(ctx, i, args.point_tokens) for i in range(1, args.points + 1)))
    ctx.release()
    return json.dumps({"skeleton": skeleton, "points": points})
