"""Parallel generation: several continuations of one prompt, concurrently.

The prompt is prefilled once; each fork shares its KV pages (the partial
last page is copied), and `asyncio.gather` runs the forks together so the
server batches their decode steps into shared forward passes.
"""

import asyncio

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="parallel-generation",
    version="0.1.0",
    description="Generates several continuations of a prompt that share its KV cache.",
    arguments=[
        inferlet.Arg("prompt", str, default="Once upon a time", help="Shared prefix."),
        inferlet.Arg("n", int, default=4, help="Number of continuations."),
        inferlet.Arg("max-tokens", int, default=32, help="Most tokens per continuation."),
        inferlet.Arg("temperature", float, default=0.8, help="Sampling temperature (0 = greedy)."),
        inferlet.Arg("seed", int, default=0, help="Base seed; continuation i uses seed + i."),
    ],
)


async def main(args) -> str:
    ctx = Context(inferlet.get_model())
    ctx.fill(args.prompt)
    await ctx.flush_async()  # prefill the shared prefix once

    forks = [await ctx.fork_async() for _ in range(args.n)]

    async def continue_(i: int, fork: Context) -> str:
        sampler = Sampler.random(args.temperature, seed=args.seed + i) if args.temperature else Sampler.greedy()
        text = await fork.generate_async(sampler, Stop(max_tokens=args.max_tokens))
        fork.release()
        return text

    texts = await asyncio.gather(*(continue_(i, f) for i, f in enumerate(forks)))
    ctx.release()
    return "\n".join(f"[{i}] {t}" for i, t in enumerate(texts))
