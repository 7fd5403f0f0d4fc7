"""Multi-turn chat that keeps its KV cache between turns.

Each line the client sends is a user turn. The conversation lives in one
Context for the whole session, so a turn only prefills what is new (the end
of the previous reply and the new user message): a chat that re-sent the
whole history each turn would recompute it every time.

    echo -e "Hi!\\nTell me more." | pie-run chat.wasm -- --max-tokens 64

Each reply goes back as one JSON message:
{"reply": text, "tokens": ids, "prefilled": n, "context": n, "stop": reason}.
"""

import json

import inferlet
from inferlet import Context, InferletError, Sampler, Stop

inferlet.declare(
    name="chat",
    version="0.1.0",
    description="Chats over messages, reusing the conversation's KV cache across turns.",
    arguments=[
        inferlet.Arg("system", str, default="You are a helpful assistant.", help="System prompt ('' = none)."),
        inferlet.Arg("max-tokens", int, default=128, help="Most tokens per reply."),
        inferlet.Arg("temperature", float, default=0.0, help="0 = greedy decoding."),
    ],
)

# Special tokens that end an assistant turn in common chat templates. The
# model's EOS stops generation anyway; these stop it at the end of the turn.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def main(args) -> str:
    model = inferlet.get_model()
    specials = model.tokenizer.special_tokens()
    stop = Stop(max_tokens=args.max_tokens, tokens=[specials[t] for t in END_OF_TURN if t in specials])
    sampler = Sampler.greedy() if args.temperature == 0 else Sampler.random(args.temperature)

    ctx = Context(model)
    if args.system:
        ctx.fill_chat([{"role": "system", "content": args.system}], add_generation_prompt=False)

    turns = 0
    while True:
        try:
            user = inferlet.receive()
        except InferletError as err:
            if err.code == "closed":  # the client has nothing more to say
                break
            raise
        # fill_chat renders the whole conversation but queues only the new
        # part; everything before it is already in the KV cache.
        ctx.fill_chat([{"role": "user", "content": user}])
        prefilled = len(ctx.pending)
        context = ctx.kv_len + prefilled
        reply = ctx.generate(sampler, stop)  # also appends the reply to the conversation
        inferlet.send(json.dumps({
            "reply": reply, "tokens": ctx.generated, "prefilled": prefilled,
            "context": context, "stop": ctx.stop_reason,
        }))
        turns += 1

    ctx.release()
    return f"{turns} turns"
