"""A program exposed as an OpenAI model in the server tests (pie-serve --expose shout=...).

It gets the request as its first message, streams the last user message
back in upper case in two pieces, and returns a final "!"."""

import json

import inferlet

inferlet.declare(name="shout", version="0.1.0", description="Shouts the last message back.")


def main(args) -> str:
    request = json.loads(inferlet.receive())
    text = request["messages"][-1]["content"] if "messages" in request else request["prompt"]
    half = len(text) // 2
    inferlet.send(text[:half].upper())
    inferlet.send(text[half:].upper())
    return "!"
