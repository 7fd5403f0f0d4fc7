"""Watermarking (Kirchenbauer et al., 2023): a green-list sampler and its detector.

Generation: before each token, the previous token (with a secret key) picks a
pseudo-random "green" fraction `gamma` of the vocabulary; `delta` is added
to the green tokens' logits, and the token is sampled from the result. The
model still decides what is likely, but green tokens win a little more
often than chance. The sampler runs here in the inferlet, over the model's
top-k next-token distribution (the tail beyond k is negligible).

Detection (`--detect TEXT`): tokenize the text, count the tokens that are
green given their predecessor, and return the z-score of that count against
the `gamma` expected without a watermark. No model pass is needed. Text
only works where it re-tokenizes into the tokens that were generated (a
token that is part of a UTF-8 character decodes to U+FFFD and does not);
`--detect-tokens` scores token ids directly.

Returns JSON: {"text", "tokens", "z", "green", "scored"} (generation) or
{"z", "green", "scored"} (detection).
"""

import json
import math
import random

import inferlet
from inferlet import Context

inferlet.declare(
    name="watermarking",
    version="0.1.0",
    description="Generates watermarked text (green/red-list sampling), or detects the watermark.",
    arguments=[
        inferlet.Arg("prompt", str, default="The history of the city", help="Text to continue."),
        inferlet.Arg("max-tokens", int, default=64, help="Tokens to generate."),
        inferlet.Arg("gamma", float, default=0.25, help="Fraction of the vocabulary that is green."),
        inferlet.Arg("delta", float, default=2.0, help="Logit bias of green tokens (0 = no watermark)."),
        inferlet.Arg("key", int, default=15485863, help="Secret key of the green lists."),
        inferlet.Arg("top-k", int, default=64, help="Tokens of the distribution the sampler sees."),
        inferlet.Arg("seed", int, default=0, help="Seed of the sampler."),
        inferlet.Arg("detect", str, default="", help="Detect the watermark in this text instead."),
        inferlet.Arg("detect-tokens", str, default="", help="... or in these token ids (','-separated)."),
    ],
)

_MASK = (1 << 64) - 1


def is_green(key: int, previous: int, token: int, gamma: float) -> bool:
    """Whether `token` is on the green list chosen by `previous` (a splitmix64 hash of the three)."""
    z = (key * 0x9E3779B97F4A7C15 + previous * 0xBF58476D1CE4E5B9 + token * 0x94D049BB133111EB) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z < gamma * 2.0 ** 64


def z_score(tokens: list, key: int, gamma: float) -> dict:
    """How far the green-token count of `tokens` is above chance, in standard deviations."""
    scored = len(tokens) - 1  # the first token has no predecessor
    green = sum(is_green(key, a, b, gamma) for a, b in zip(tokens, tokens[1:]))
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma)) if scored > 0 else 0.0
    return {"z": z, "green": green, "scored": scored}


def main(args) -> str:
    model = inferlet.get_model()
    if args.detect or args.detect_tokens:
        tokens = ([int(t) for t in args.detect_tokens.split(",")] if args.detect_tokens
                  else model.tokenizer.encode(args.detect))
        return json.dumps(z_score(tokens, args.key, args.gamma))

    eos = set(model.eos_tokens)
    rng = random.Random(args.seed)
    ctx = Context(model)
    ctx.fill(args.prompt)
    previous = ctx.pending[-1]
    tokens = []
    for _ in range(args.max_tokens):
        ids, probs = ctx.next_distribution(k=args.top_k)
        # log p + delta on the green list, then sample from the softmax.
        logits = [math.log(p) + (args.delta if is_green(args.key, previous, t, args.gamma) else 0.0) if p > 0
                  else -math.inf for t, p in zip(ids, probs)]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        token = rng.choices(ids, weights)[0]
        if token in eos:
            break
        tokens.append(token)
        ctx.fill_tokens([token])
        previous = token
    ctx.release()
    text = model.tokenizer.decode(tokens)
    return json.dumps({"text": text, "tokens": tokens, **z_score(tokens, args.key, args.gamma)})
