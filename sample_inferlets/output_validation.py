"""Output validation: rank candidate answers by how likely the model finds them.

The prompt is prefilled once; each candidate gets a fork (sharing the
prompt's KV) and ONE forward pass over its tokens that asks for the
log-probability of each candidate token given everything before it. The
forks run concurrently, so the server batches them. A candidate's score is
the sum of its tokens' log-probabilities (the log-probability of the whole
answer).

Returns a JSON list of {"candidate", "logprob", "tokens"}, most likely first.
"""

import asyncio
import json

import inferlet
from inferlet import Context, raw

inferlet.declare(
    name="output-validation",
    version="0.1.0",
    description="Scores candidate continuations of a prompt by their log-probability.",
    arguments=[
        inferlet.Arg("prompt", str, default="The capital of France is", help="The question or prefix."),
        inferlet.Arg("candidates", str, default=" Paris| London| Berlin",
                     help="Candidate continuations, separated by '|'."),
    ],
)


async def score(prompt: Context, candidate: str) -> dict:
    ctx = await prompt.fork_async()
    tokens = ctx.model.tokenizer.encode(candidate)
    ctx.fill_tokens(tokens)
    # Pending: the prompt's last token, then the candidate; the distribution
    # after pending token i is the one that predicts candidate token i.
    outputs = [raw.OutputRequestLogprobs(raw.LogprobsSpec(index=i, tokens=[t])) for i, t in enumerate(tokens)]
    results = await ctx.forward_async(outputs)
    ctx.release()
    return {"candidate": candidate, "logprob": sum(out.value[0] for out in results), "tokens": tokens}


async def main(args) -> str:
    prompt = Context(inferlet.get_model())
    prompt.fill(args.prompt)
    await prompt.flush_async()  # prefill the shared prompt once (its last token stays pending)
    candidates = [c for c in args.candidates.split("|") if c]
    scored = await asyncio.gather(*(score(prompt, c) for c in candidates))
    prompt.release()
    return json.dumps(sorted(scored, key=lambda s: s["logprob"], reverse=True))
