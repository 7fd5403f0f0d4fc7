"""Tree of thought: expand a tree of partial solutions, keep the most likely leaf.

The prompt is prefilled once. Each node of the tree is a Context; its
children are forks, so every node shares the KV pages of the prompt and of
its ancestors' thoughts (only a partial last page is copied). A node's
`branching` children start with its `branching` most likely next tokens
(distinct thoughts) and continue greedily for `thought-tokens` tokens. All
the nodes of one level are expanded concurrently with `asyncio.gather`, so
the server batches their forward passes. A thought is scored by the model's
own log-probability of its tokens; a leaf's score is the sum along its path.

Returns JSON: {"best", "text", "leaves": [{"path", "tokens", "logprob"}],
"prompt_tokens", "peak_pages", "pages_if_copied"}. `peak_pages` counts the
distinct KV pages held at the widest level; `pages_if_copied` is what the
same contexts would hold without sharing.
"""

import asyncio
import json
import math

import inferlet
from inferlet import Context, raw

inferlet.declare(
    name="tree-of-thought",
    version="0.1.0",
    description="Tree-of-thought search over forks sharing the prompt's KV cache.",
    arguments=[
        inferlet.Arg("prompt", str, default="Q: How do I sort a list? Let's think step by step.",
                     help="The problem."),
        inferlet.Arg("depth", int, default=2, help="Levels of thoughts."),
        inferlet.Arg("branching", int, default=3, help="Children per node."),
        inferlet.Arg("thought-tokens", int, default=8, help="Tokens per thought."),
    ],
)


class Node:
    def __init__(self, ctx: Context, path: list, tokens: list, logprob: float) -> None:
        self.ctx = ctx
        self.path = path  # child index at each level
        self.tokens = tokens  # thought tokens from the root to here
        self.logprob = logprob


async def top_tokens(ctx: Context, k: int) -> list:
    """(token, log-probability) of the k most likely tokens after ctx's pending tokens (now in KV)."""
    spec = raw.DistributionSpec(index=len(ctx.pending) - 1, k=k, temperature=1.0)
    (out,) = await ctx.forward_async([raw.OutputRequestDistribution(spec)])
    ids, probs = out.value
    return [(t, math.log(p)) for t, p in zip(ids, probs) if p > 0]


async def think(ctx: Context, first: int, first_logprob: float, n: int) -> tuple:
    """A thought: `first`, then greedy tokens; its tokens and total log-probability."""
    tokens, logprob = [first], first_logprob
    ctx.fill_tokens([first])
    for _ in range(n - 1):
        ((token, lp),) = await top_tokens(ctx, 1)  # greedy, with the token's probability
        ctx.fill_tokens([token])
        tokens.append(token)
        logprob += lp
    return tokens, logprob


async def expand(node: Node, branching: int, n: int) -> list:
    """The node's children, their thoughts generated concurrently; the node's context is released."""
    top = await top_tokens(node.ctx, branching)
    forks = [await node.ctx.fork_async() for _ in top]  # share every full page of the node
    thoughts = await asyncio.gather(*(think(f, t, lp, n) for f, (t, lp) in zip(forks, top)))
    # Once the children have run (their copies of its partial page done), the
    # node goes: the pages they share stay with them.
    node.ctx.release()
    return [Node(f, node.path + [i], node.tokens + toks, node.logprob + lp)
            for i, (f, (toks, lp)) in enumerate(zip(forks, thoughts))]


async def main(args) -> str:
    model = inferlet.get_model()
    root = Context(model)
    root.fill(args.prompt)
    prompt_tokens = list(root.pending)
    await root.flush_async()  # the prompt's KV is computed once, for the whole tree

    frontier = [Node(root, [], [], 0.0)]
    peak_pages = pages_if_copied = 0
    for _ in range(args.depth):
        levels = await asyncio.gather(*(expand(n, args.branching, args.thought_tokens) for n in frontier))
        frontier = [child for children in levels for child in children]
        held = {page for node in frontier for page in node.ctx.pages}
        if len(held) > peak_pages:
            peak_pages = len(held)
            pages_if_copied = sum(len(node.ctx.pages) for node in frontier)

    best = max(frontier, key=lambda node: node.logprob)
    result = {
        "best": best.path, "text": model.tokenizer.decode(best.tokens), "prompt_tokens": prompt_tokens,
        "leaves": [{"path": n.path, "tokens": n.tokens, "logprob": n.logprob} for n in frontier],
        "peak_pages": peak_pages, "pages_if_copied": pages_if_copied,
    }
    for node in frontier:
        node.ctx.release()
    return json.dumps(result)
