"""pie-serve: the network front of the runtime (client protocol, OpenAI-compatible API, health, metrics)."""
