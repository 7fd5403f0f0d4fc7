"""Jacobi decoding: greedy decoding that guesses a block of tokens and fixes it in place.

Each pass runs the newest token plus a guess of the next `block` tokens and
draws a greedy token after every one of them. The first draw is always
right; each guessed token that equals the draw before it makes the next
draw right too, so a pass yields 1 + (matching prefix of the guess) tokens.
The KV of the guess beyond the match is rolled back, and the draws after
it become the next guess: iterating the block like this is Jacobi's
fixed-point method, and it converges fast on repetitive text. No draft
model, and the output is exactly plain greedy decoding's.

Returns JSON: {"text", "tokens", "passes", "accepted"}.
"""

import json

import inferlet
from inferlet import Context, Sampler, raw

inferlet.declare(
    name="jacobi-decoding",
    version="0.1.0",
    description="Greedy decoding sped up by Jacobi iteration over a block of guessed tokens.",
    arguments=[
        inferlet.Arg("prompt", str, default="a b c a b c a b", help="Text to continue."),
        inferlet.Arg("max-tokens", int, default=32, help="Most tokens to generate."),
        inferlet.Arg("block", int, default=4, help="Tokens guessed per pass."),
    ],
)


def main(args) -> str:
    model = inferlet.get_model()
    eos = set(model.eos_tokens)
    greedy = Sampler.greedy()
    ctx = Context(model)
    ctx.fill(args.prompt)
    ctx.flush()  # the prompt, except its last token, which starts the first block
    guess = [ctx.pending[-1]] * args.block  # any guess will do; a repeat of the last token is cheap

    generated: list = []
    passes = accepted = 0
    while len(generated) < args.max_tokens and not (generated and generated[-1] in eos):
        ctx.fill_tokens(guess)  # pending: the newest token, then the guess
        outputs = [raw.OutputRequestSample(raw.SampleSpec(**greedy.spec_fields(i, 0)))
                   for i in range(len(guess) + 1)]
        drawn = [out.value for out in ctx.forward(outputs)]
        passes += 1

        matched = 0  # guess[i] is right when it equals the draw it stands in for
        while matched < len(guess) and guess[matched] == drawn[matched] and drawn[matched] not in eos:
            matched += 1
        new = drawn[:matched + 1]
        accepted += matched
        ctx.rollback(len(guess) - matched)  # keep the KV of the right guesses only
        guess = (drawn[matched + 1:] + [drawn[-1]] * args.block)[:args.block]
        for token in new:
            generated.append(token)
            if token in eos or len(generated) == args.max_tokens:
                break
        ctx.fill_tokens([generated[-1]])

    text_tokens = generated[:-1] if generated and generated[-1] in eos else generated
    ctx.release()
    return json.dumps({"text": model.tokenizer.decode(text_tokens), "tokens": generated, "passes": passes,
                       "accepted": accepted})
