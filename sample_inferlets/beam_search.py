"""Beam search: keep the `width` most likely continuations, step by step.

Each beam is a Context. A step asks every live beam for its top-`width`
next tokens (all beams in one batched round, via asyncio.gather), keeps the
`width` best extensions by total log-probability, and forks a beam once per
extra child: forks share the KV pages of the common prefix, so a beam costs
only its own tail. Beams that are not extended are released.

Returns a JSON list of {"text", "tokens", "logprob"}, best first; "logprob"
is the sum of the natural-log probabilities of the beam's tokens.
"""

import asyncio
import json
import math

import inferlet
from inferlet import Context, raw

inferlet.declare(
    name="beam-search",
    version="0.1.0",
    description="Beam search over the model's next-token distributions.",
    arguments=[
        inferlet.Arg("prompt", str, default="The quick brown fox", help="Text to continue."),
        inferlet.Arg("width", int, default=4, help="Number of beams."),
        inferlet.Arg("max-tokens", int, default=16, help="Most tokens per beam."),
    ],
)


class Beam:
    def __init__(self, ctx: Context, tokens: list, logprob: float, done: bool = False) -> None:
        self.ctx = ctx
        self.tokens = tokens
        self.logprob = logprob
        self.done = done  # ended with an end-of-sequence token


async def top_tokens(ctx: Context, k: int) -> list:
    """(token, log-probability) of the k most likely next tokens after ctx's pending tokens."""
    spec = raw.DistributionSpec(index=len(ctx.pending) - 1, k=k, temperature=1.0)
    (out,) = await ctx.forward_async([raw.OutputRequestDistribution(spec)])
    ids, probs = out.value
    return [(t, math.log(p)) for t, p in zip(ids, probs) if p > 0]


async def main(args) -> str:
    model = inferlet.get_model()
    eos = set(model.eos_tokens)
    root = Context(model)
    root.fill(args.prompt)
    beams = [Beam(root, [], 0.0)]

    for _ in range(args.max_tokens):
        live = [b for b in beams if not b.done]
        if not live:
            break
        tops = await asyncio.gather(*(top_tokens(b.ctx, args.width) for b in live))
        # Finished beams compete with the extensions as they are.
        candidates = [(b.logprob, b, None) for b in beams if b.done]
        for beam, top in zip(live, tops):
            candidates += [(beam.logprob + lp, beam, token) for token, lp in top]
        candidates.sort(key=lambda c: c[0], reverse=True)
        chosen = candidates[:args.width]

        # A parent with n chosen children is forked n - 1 times and reused
        # for the last one; a parent with none gives its pages back.
        children = {id(b): [c for c in chosen if c[1] is b and c[2] is not None] for b in live}
        next_beams = [c[1] for c in chosen if c[2] is None]
        for beam in live:
            picks = children[id(beam)]
            if not picks:
                beam.ctx.release()
                continue
            contexts = [await beam.ctx.fork_async() for _ in picks[1:]] + [beam.ctx]
            for (score, _, token), ctx in zip(picks, contexts):
                ctx.fill_tokens([token])
                next_beams.append(Beam(ctx, beam.tokens + [token], score, token in eos))
        beams = sorted(next_beams, key=lambda b: b.logprob, reverse=True)

    result = []
    for beam in beams:
        text_tokens = beam.tokens[:-1] if beam.done else beam.tokens  # EOS is not text
        result.append({"text": model.tokenizer.decode(text_tokens), "tokens": beam.tokens,
                       "logprob": beam.logprob})
        beam.ctx.release()
    return json.dumps(result)
