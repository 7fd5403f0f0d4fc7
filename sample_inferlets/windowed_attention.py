"""Windowed (sliding-window) attention with per-pass attention masks.

Every token attends to the last `window` tokens only (itself included). The
prompt is prefilled in one pass whose mask is a band, and each decode pass
carries a mask over the KV that hides everything before the window; pages
that fall wholly before it are dropped, so the KV held stays bounded. RoPE
positions keep counting up. (attention_sink.py does the same with
`mask_tokens`, which hides slots for good, plus a few always-visible sink
tokens; a per-pass mask leaves the KV untouched for other readers.)

Returns JSON: {"text", "tokens", "max_pages"}.
"""

import json

import inferlet
from inferlet import Context, Sampler, brle, raw

inferlet.declare(
    name="windowed-attention",
    version="0.1.0",
    description="Generates with a sliding attention window and a bounded KV cache.",
    arguments=[
        inferlet.Arg("prompt", str, default="Once upon a time", help="Text to continue."),
        inferlet.Arg("max-tokens", int, default=256, help="Tokens to generate."),
        inferlet.Arg("window", int, default=64, help="Most recent tokens every token attends to."),
    ],
)


def band(kv_len: int, new: int, window: int) -> list:
    """Masks for `new` tokens appended to `kv_len` slots: each sees the `window` slots ending at itself."""
    return [brle.from_ranges(kv_len + new, [(max(0, i + 1 - window), i + 1)])
            for i in range(kv_len, kv_len + new)]


def main(args) -> str:
    model = inferlet.get_model()
    ps = model.page_size
    eos = set(model.eos_tokens)
    greedy = Sampler.greedy()
    ctx = Context(model)
    ctx.fill(args.prompt)

    generated: list = []
    max_pages = 0
    while len(generated) < args.max_tokens:
        # Pages wholly before the next pass's window are not needed any more.
        drop_end = (ctx.kv_len + 1 - args.window) // ps * ps
        if drop_end > 0:
            ctx.drop(0, drop_end)
        sample = raw.OutputRequestSample(raw.SampleSpec(**greedy.spec_fields(len(ctx.pending) - 1, 0)))
        (out,) = ctx.forward([sample], mask=band(ctx.kv_len, len(ctx.pending), args.window))
        max_pages = max(max_pages, len(ctx.pages))
        generated.append(out.value)
        if out.value in eos:
            break
        ctx.fill_tokens([out.value])

    text_tokens = generated[:-1] if generated and generated[-1] in eos else generated
    ctx.release()
    return json.dumps({"text": model.tokenizer.decode(text_tokens), "tokens": generated, "max_pages": max_pages})
