"""Graph of thought: generate thoughts in parallel, keep the best, merge them into one.

Unlike a tree, a graph of thought can join branches. Here: `n` thoughts are
generated concurrently by forks of the prompt (sharing its KV), started from
the `n` most likely first tokens; each is scored by its mean log-probability;
the best `keep` are then aggregated by a new fork of the prompt that reads
them ("Idea 1: ... Idea 2: ...") and writes a combined thought. Only the
aggregation's short inputs are prefilled again; the prompt's KV is reused.

Returns JSON: {"prompt_tokens", "thoughts": [{"tokens", "score"}], "kept",
"merged": {"text", "tokens"}}.
"""

import asyncio
import json
import math

import inferlet
from inferlet import Context, Sampler, Stop, raw

inferlet.declare(
    name="graph-of-thought",
    version="0.1.0",
    description="Parallel thoughts over a shared prompt, scored and merged into one.",
    arguments=[
        inferlet.Arg("prompt", str, default="Q: Name ways to reduce memory use. Ideas:", help="The problem."),
        inferlet.Arg("n", int, default=3, help="Thoughts generated in parallel."),
        inferlet.Arg("keep", int, default=2, help="Best thoughts merged."),
        inferlet.Arg("thought-tokens", int, default=12, help="Tokens per thought."),
        inferlet.Arg("merge-tokens", int, default=24, help="Most tokens of the merged thought."),
    ],
)


async def next_tokens(ctx: Context, k: int) -> list:
    """(token, log-probability) of the k most likely tokens after ctx's pending tokens."""
    spec = raw.DistributionSpec(index=len(ctx.pending) - 1, k=k, temperature=1.0)
    (out,) = await ctx.forward_async([raw.OutputRequestDistribution(spec)])
    ids, probs = out.value
    return [(t, math.log(p)) for t, p in zip(ids, probs)]


async def thought(root: Context, first: int, first_lp: float, n: int) -> dict:
    """A thought starting with `first`, continued greedily; scored by its mean log-probability."""
    ctx = await root.fork_async()
    tokens, logprob = [first], first_lp
    ctx.fill_tokens([first])
    while len(tokens) < n:
        ((token, lp),) = await next_tokens(ctx, 1)
        ctx.fill_tokens([token])
        tokens.append(token)
        logprob += lp
    ctx.release()
    return {"tokens": tokens, "score": logprob / len(tokens)}


async def main(args) -> str:
    model = inferlet.get_model()
    root = Context(model)
    root.fill(args.prompt)
    prompt_tokens = list(root.pending)
    firsts = await next_tokens(root, args.n)  # prefills the prompt; distinct starts for the thoughts
    thoughts = await asyncio.gather(*(thought(root, t, lp, args.thought_tokens) for t, lp in firsts))

    # The join: one node that sees the best thoughts, in rank order.
    kept = sorted(range(len(thoughts)), key=lambda i: thoughts[i]["score"], reverse=True)[:args.keep]
    merge = await root.fork_async()
    for rank, i in enumerate(kept, start=1):
        merge.fill(f"\nIdea {rank}:")
        merge.fill_tokens(thoughts[i]["tokens"])
    merge.fill("\nCombined:")
    text = await merge.generate_async(Sampler.greedy(), Stop(max_tokens=args.merge_tokens))
    result = {"prompt_tokens": prompt_tokens, "thoughts": thoughts, "kept": kept,
              "merged": {"text": text, "tokens": merge.generated}}
    merge.release()
    root.release()
    return json.dumps(result)
