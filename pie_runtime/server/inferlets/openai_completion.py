"""OpenAI-compatible completions, as an inferlet.

`pie-serve` runs one instance of this program for every /v1/completions and
/v1/chat/completions request, batched with all other traffic. The server
checks the request and sends it, normalised, as the first message:

    {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]},
    "max_tokens": int or null, "temperature": float, "top_p": float,
    "seed": int or null, "stop": [str, ...], "n": int,
    "json_schema": {...} or null, "prefix_cache": bool,
    "logprobs": null, or how many alternatives to report per token (0..20)

Messages sent back, one JSON object each:

    {"t": "d", "i": CHOICE, "x": TEXT}        more text of choice CHOICE
    {"t": "l", "i": CHOICE, "p": [[TOKEN, LOGPROB, [[ID, LOGPROB], ...]], ...]}
                                              with "logprobs": the next tokens of choice CHOICE
                                              (sent before the text they make up)
    {"t": "f", "i": CHOICE, "r": REASON}      choice CHOICE ended: "stop" or "length"
    {"t": "e", "c": CODE, "m": MESSAGE}       the request cannot be served (e.g. too long)

and the return value is the usage: {"prompt_tokens", "completion_tokens",
"cached_tokens"}. Text is only sent once it cannot be cut by a stop string
or end in half a character.

Prefix caching: a chat whose system messages fill at least one KV page
reuses their KV across requests (of one tenant: exports are namespaced). The
first request exports the whole pages of that prefix (persistent, by a hash
of its tokens); later ones import them and prefill only the rest.
"""

import asyncio
import hashlib
import json

import inferlet
from inferlet import Context, Grammar, InferletError, Sampler, Stop

inferlet.declare(
    name="openai-completion",
    version="0.1.0",
    description="Serves one OpenAI-style completion or chat completion request (pie-serve runs it).",
)

PREFIX_EXPORT = "openai-prefix-"


def emit(kind, **fields):
    inferlet.send(json.dumps({"t": kind, **fields}, separators=(",", ":")))


class TextStream:
    """Sends a choice's text as it grows, never past a possible stop string or half a character.

    Tokens come in bursts (a decode run hands over several at once): the text
    is decoded and sent once per burst, when the event loop next runs, not
    once per token."""

    def __init__(self, index, tokenizer, stop_strings, eos_tokens, logprobs_of=None):
        self.index = index
        self.logprobs_of = logprobs_of  # the generating Context, when log-probabilities are wanted
        self.pending_logprobs = []
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.eos_tokens = eos_tokens
        self.tokens = []
        self.sent = 0
        self.scheduled = False
        self.closed = False

    def on_token(self, token):
        if token in self.eos_tokens:
            return
        self.tokens.append(token)
        if self.logprobs_of is not None:
            entry = self.logprobs_of.logprobs[-1]  # the SDK appends it before calling on_token
            self.pending_logprobs.append([entry.token, entry.logprob, [list(alt) for alt in entry.top]])
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.send_safe_text)

    def send_safe_text(self):
        self.scheduled = False
        if self.closed:
            return
        text = self.tokenizer.decode(self.tokens)
        safe = len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            hit = text.find(stop)
            if hit >= 0:
                safe = min(safe, hit)
            # A tail that could still grow into a stop string stays back.
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        self.flush(text[:safe])

    def flush(self, text):
        if self.pending_logprobs:
            emit("l", i=self.index, p=self.pending_logprobs)
            self.pending_logprobs = []
        if len(text) > self.sent:
            emit("d", i=self.index, x=text[self.sent:])
            self.sent = len(text)

    def close(self, final_text):
        """Sends the rest of the final text; nothing more after it."""
        self.flush(final_text)
        self.closed = True


def prompt_tokens(model, request):
    """The prompt's token ids, exactly as Context.fill / fill_chat would put them, and the
    length of the chat's system-message prefix (0 if none)."""
    tokenizer = model.tokenizer
    bos = model.info.bos_token
    if "messages" in request:
        messages = request["messages"]
        text = model.apply_chat_template(messages, True)
        system = [m for m in messages if m["role"] == "system"]
        prefix_text = model.apply_chat_template(system, False) if system and messages[0]["role"] == "system" else ""
    else:
        text, prefix_text = request["prompt"], ""
    tokens = tokenizer.encode(text)
    if bos is not None and tokens and tokens[0] != bos:
        tokens.insert(0, bos)
    prefix = 0
    if prefix_text and text.startswith(prefix_text):
        prefix_ids = tokenizer.encode(prefix_text)
        if bos is not None and prefix_ids and prefix_ids[0] != bos:
            prefix_ids.insert(0, bos)
        if tokens[:len(prefix_ids)] == prefix_ids:
            prefix = len(prefix_ids)
    return tokens, prefix


def start_context(model, tokens, prefix, use_cache):
    """A context with `tokens` pending, the cached whole pages of the prefix imported if any.
    Returns (context, tokens whose KV came from the cache)."""
    page_size = model.page_size
    aligned = prefix // page_size * page_size if use_cache else 0
    if aligned == 0:
        ctx = Context(model)
        ctx.fill_tokens(tokens)
        return ctx, 0
    digest = hashlib.sha256(json.dumps([model.name, tokens[:aligned]]).encode()).hexdigest()[:40]
    name = PREFIX_EXPORT + digest
    try:
        ctx = Context.import_(model, name)
        if ctx.kv_len == aligned:
            ctx.fill_tokens(tokens[aligned:])
            return ctx, aligned
        ctx.release()
    except InferletError as e:
        if e.code != "not-found":
            raise
    ctx = Context(model)
    ctx.fill_tokens(tokens[:aligned])
    try:
        ctx.export(name, persistent=True)  # prefills the prefix first
    except InferletError as e:
        if e.code != "already-exists":  # another request exported it meanwhile: fine
            raise
    ctx.fill_tokens(tokens[aligned:])
    return ctx, 0


def sampler_for(request, choice):
    logprobs = request.get("logprobs")
    if request["temperature"] == 0:
        return Sampler(logprobs=logprobs)
    seed = request["seed"]
    return Sampler(temperature=request["temperature"], top_p=request["top_p"],
                   seed=None if seed is None else seed + choice, logprobs=logprobs)


async def generate_choice(ctx, index, request, max_tokens):
    model = ctx.model
    stream = TextStream(index, model.tokenizer, request["stop"], set(model.eos_tokens),
                        ctx if request.get("logprobs") is not None else None)
    grammar = Grammar.json_schema(request["json_schema"]) if request["json_schema"] is not None else None
    text = await ctx.generate_async(sampler_for(request, index), Stop(max_tokens=max_tokens, strings=request["stop"]),
                                    on_token=stream.on_token, grammar=grammar)
    stream.close(text)
    reason = "length" if ctx.stop_reason == "max-tokens" else "stop"
    emit("f", i=index, r=reason)
    generated = len(ctx.generated)
    ctx.release()
    return generated


async def main(args) -> str:
    request = json.loads(await inferlet.receive_async())
    model = inferlet.get_model()
    tokens, prefix = prompt_tokens(model, request)
    room = model.info.max_positions - len(tokens)
    max_tokens = request["max_tokens"] if request["max_tokens"] is not None else room
    if room < 1 or max_tokens > room:
        emit("e", c="context_length_exceeded",
             m=f"this model's context is {model.info.max_positions} tokens; the prompt has {len(tokens)} "
               f"and {max_tokens} more were asked for")
        return json.dumps({"prompt_tokens": len(tokens), "completion_tokens": 0, "cached_tokens": 0})
    ctx, cached = start_context(model, tokens, prefix, request["prefix_cache"])
    n = request["n"]
    contexts = [ctx]
    if n > 1:
        await ctx.flush_async()  # the prompt once; the forks share its pages
        contexts += [await ctx.fork_async() for _ in range(n - 1)]
    counts = await asyncio.gather(*(generate_choice(c, i, request, max_tokens) for i, c in enumerate(contexts)))
    return json.dumps({"prompt_tokens": len(tokens), "completion_tokens": sum(counts), "cached_tokens": cached})
