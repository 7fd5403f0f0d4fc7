"""Text completion: the smallest useful inferlet.

Build and run:
    pie-build sample_inferlets/text_completion.py
    pie-run text-completion.wasm -- --prompt "The capital of France is"
"""

import inferlet
from inferlet import Context, Sampler, Stop

# What this inferlet is and what it accepts. pie-build reads this call
# without running the file, checks it, and embeds it in the component:
# pie-run validates launch arguments against it and shows it for --help.
inferlet.declare(
    name="text-completion",
    version="0.1.0",
    description="Completes a prompt with the server's default model.",
    arguments=[
        inferlet.Arg("prompt", str, default="The capital of France is", help="Text to complete."),
        inferlet.Arg("max-tokens", int, default=64, help="Most tokens to generate."),
        inferlet.Arg("temperature", float, default=0.0, help="0 = greedy decoding."),
        inferlet.Arg("top-p", float, default=1.0, help="Nucleus sampling threshold (1 = off)."),
        inferlet.Arg("seed", int, help="Seed for reproducible sampling."),
        inferlet.Arg("chat", bool, help="Wrap the prompt in the model's chat template."),
    ],
)


def main(args) -> str:
    model = inferlet.get_model()  # the server's default model
    ctx = Context(model)  # a sequence with its own KV pages and command queue

    if args.chat:
        ctx.fill_chat([{"role": "user", "content": args.prompt}])
    else:
        ctx.fill(args.prompt)

    if args.temperature == 0:
        sampler = Sampler.greedy()
    else:
        sampler = Sampler.random(args.temperature, top_p=args.top_p, seed=args.seed)

    # Prefill the prompt in one pass, then one pass per new token until an
    # end-of-sequence token or max-tokens. Only the new text is returned.
    completion = ctx.generate(sampler, Stop(max_tokens=args.max_tokens))
    ctx.release()
    return completion
