"""Attention sink + sliding window (StreamingLLM): bounded KV memory for long generations.

Every new token attends to the first `sink` tokens and the last `window`
tokens only. Tokens that leave the window are masked at once (exact,
token-granular eviction); when a whole page has left it, the page is
dropped and goes back to the server, so the pages held stay bounded however
long the generation runs. RoPE positions keep counting up (the KV keeps the
positions it was computed with), so the model still sees an ordered stream.
With `--sink 0` this is plain windowed attention.

Returns JSON: {"text", "tokens", "max_pages", "kv_len"}.
"""

import json

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="attention-sink",
    version="0.1.0",
    description="Generates with a sink + sliding-window KV cache of bounded size.",
    arguments=[
        inferlet.Arg("prompt", str, default="Once upon a time", help="Text to continue."),
        inferlet.Arg("max-tokens", int, default=256, help="Tokens to generate."),
        inferlet.Arg("sink", int, default=4, help="First tokens every token keeps attending to."),
        inferlet.Arg("window", int, default=64, help="Most recent tokens every token attends to."),
    ],
)


def main(args) -> str:
    model = inferlet.get_model()
    ps = model.page_size
    ctx = Context(model)
    ctx.fill(args.prompt)

    sink_end = -(-args.sink // ps) * ps  # pages holding the sink are never dropped
    masked_end = args.sink  # KV tokens [sink, masked_end) are masked already
    max_pages = 0
    generated: list = []
    for _ in range(args.max_tokens):
        # Evict what the next token must not see: the KV before the window, after the sink.
        window_start = ctx.kv_len - args.window
        if window_start > masked_end:
            ctx.mask_tokens(masked_end, window_start)
            masked_end = window_start
        # Whole masked pages: give them back. Later tokens shift down by what was dropped.
        drop_end = masked_end // ps * ps
        if drop_end > sink_end:
            ctx.drop(sink_end, drop_end)
            masked_end -= drop_end - sink_end

        ctx.generate(Sampler.greedy(), Stop(max_tokens=1))  # one forward pass, one token
        max_pages = max(max_pages, len(ctx.pages))
        generated += ctx.generated
        if ctx.stop_reason == "eos":
            break

    result = {"text": model.tokenizer.decode(generated), "tokens": generated, "max_pages": max_pages,
              "kv_len": ctx.kv_len}
    ctx.release()
    return json.dumps(result)
