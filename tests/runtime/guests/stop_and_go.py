"""Test inferlet for how generate() ends (built with pie-build, unlike the raw probe).

Generates greedily from `--prompt` until `--stop-token` (or `--max-tokens`),
then goes on from there (the stop token filled back in) for `--more` tokens,
and returns both parts, the stop reasons and the KV length as JSON. Decode
runs (the server's decode-run hint) draw past a stop token, and with its
queue-ahead hint a whole run is queued behind the one that stops: all of it
must be rolled back, and the second part shows whether the KV it continues
from is exactly prompt + first part.
"""

import json

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="stop-and-go",
    description="Generates to a stop token, then goes on.",
    arguments=[
        inferlet.Arg("prompt", str, default="Once upon a time"),
        inferlet.Arg("stop-token", int, default=-1, help="Token that ends the first part (-1 = none)."),
        inferlet.Arg("max-tokens", int, default=8),
        inferlet.Arg("more", int, default=4, help="Tokens generated after the stop."),
    ],
)


def main(args) -> str:
    ctx = Context(inferlet.get_model())
    ctx.fill(args.prompt)
    stop_tokens = [args.stop_token] if args.stop_token >= 0 else []
    ctx.generate(Sampler.greedy(), Stop(max_tokens=args.max_tokens, tokens=stop_tokens, eos=False))
    first, first_reason = list(ctx.generated), ctx.stop_reason
    if first_reason == "eos":
        ctx.fill_tokens([args.stop_token])  # a stop token is not kept: put it back
    ctx.generate(Sampler.greedy(), Stop(max_tokens=args.more, eos=False))
    result = {"first": first, "first_reason": first_reason, "second": list(ctx.generated),
              "kv_len": ctx.kv_len, "pending": len(ctx.pending)}
    ctx.release()
    return json.dumps(result)
