"""Prefix caching: compute a long system prompt's KV once, reuse it in every later run.

The first run prefills the system prompt and exports its KV pages under a
name derived from the prompt's text (persistent: the export outlives the
run). Later runs on the same server import those pages, zero copy, and
prefill only their own prompt. Importers never write into the shared pages:
the SDK copies a shared partial page before appending to it.

Returns JSON: {"text", "tokens", "cached", "saved", "prefilled"}.
"""

import hashlib
import json

import inferlet
from inferlet import Context, InferletError, Sampler, Stop

inferlet.declare(
    name="prefix-caching",
    version="0.1.0",
    description="Reuses a system prompt's KV cache across runs via export/import.",
    arguments=[
        inferlet.Arg("system", str, default="You are a careful assistant. Answer briefly and cite sources.",
                     help="The shared prefix (cached across runs)."),
        inferlet.Arg("prompt", str, default="What is a KV cache?", help="This run's own text."),
        inferlet.Arg("max-tokens", int, default=32, help="Most tokens to generate."),
    ],
)


def main(args) -> str:
    model = inferlet.get_model()
    # The name depends on the model and the exact text: a different prefix never matches.
    name = "prefix-cache/" + hashlib.sha256(f"{model.name}\0{args.system}".encode()).hexdigest()[:32]

    try:
        ctx = Context.import_(model, name)
    except InferletError as err:
        if err.code != "not-found":
            raise
        ctx = None  # the first run on this server (or the export was withdrawn)
    cached = ctx is not None
    if ctx is None:
        ctx = Context(model)
        ctx.fill(args.system)
        try:
            ctx.export(name, persistent=True)  # prefills the prefix, then publishes its pages
        except InferletError as err:
            if err.code != "already-exists":
                raise
            # A concurrent run published it first: ours is just as good for this run.
    saved = ctx.kv_len if cached else 0

    ctx.fill(args.prompt)
    prefilled = len(ctx.pending)
    text = ctx.generate(Sampler.greedy(), Stop(max_tokens=args.max_tokens))
    result = {"text": text, "tokens": ctx.generated, "cached": cached, "saved": saved, "prefilled": prefilled}
    ctx.release()  # the export keeps its pages alive for the next run
    return json.dumps(result)
