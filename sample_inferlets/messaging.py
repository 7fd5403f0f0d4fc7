"""Messaging: a conversation with the client over send/receive.

Every message the client sends is answered at once with a reply that the
server computed (here: the message echoed with its token count), until the
client closes its side. With `pie-run`, each stdin line is one message and
each reply is printed as one line.

    printf 'hello\\nworld\\n' | pie-run messaging.wasm

Each reply is JSON: {"n", "echo", "tokens"}; returns "N messages".
"""

import json

import inferlet
from inferlet import InferletError

inferlet.declare(
    name="messaging",
    version="0.1.0",
    description="Echoes client messages with their token counts.",
    arguments=[inferlet.Arg("upper", bool, default=False, help="Echo in upper case.")],
)


def main(args) -> str:
    tokenizer = inferlet.get_model().tokenizer
    count = 0
    while True:
        try:
            message = inferlet.receive()
        except InferletError as err:
            if err.code == "closed":  # the client has nothing more to say
                break
            raise
        count += 1
        echo = message.upper() if args.upper else message
        inferlet.send(json.dumps({"n": count, "echo": echo, "tokens": len(tokenizer.encode(message))}))
    return f"{count} messages"
