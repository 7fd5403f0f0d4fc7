"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (+ SSE).

Each request runs an inferlet on the server, batched with all other
traffic: the built-in `openai-completion` program for the served model, or
the program an operator exposed under the requested model name
(`--expose NAME=PROGRAM`). The request goes to the instance as its first
message; what it sends back becomes the completion. A client that goes away
mid-request has its instance terminated.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pie_client.protocol import TERMINAL_EVENTS, ProtocolError
from pie_runtime.server.openai_logprobs import ChoiceLogprobs
from pie_runtime.server.openai_schema import ChatRequest, CompletionRequest, OpenAIError, parse_body

router = APIRouter()

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 1.0
# The status logged for a request whose client left before the answer (nginx's convention).
CLIENT_CLOSED = 499
_LAUNCH_ERRORS = {"limit": (429, "rate_limit_exceeded"), "unavailable": (503, "server_unavailable")}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = request.app.state.pie
    state.http_tenant(request)
    created = int(state.started_at)
    data = [{"id": name, "object": "model", "created": created, "owned_by": "pie"} for name in state.openai_models()]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _complete(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _complete(request, chat=False)


async def _complete(request: Request, chat: bool) -> Any:
    state = request.app.state.pie
    endpoint = "chat" if chat else "completions"
    try:
        tenant = state.http_tenant(request)
        state.http_ready()
        try:
            body = await request.json()
        except ValueError:
            raise OpenAIError(400, "the request body is not valid JSON") from None
        model_name = body.get("model") if isinstance(body, dict) else None
        exposed = state.exposed_program(model_name) if isinstance(model_name, str) else None
        if exposed is not None:
            if not isinstance(body.get("stream", False), bool):
                raise OpenAIError(400, "Invalid value for 'stream': must be true or false", param="stream")
            run = _Run(state, request, tenant, exposed, json.dumps(body), chat, model_name, exposed=True,
                       stream=body.get("stream", False), include_usage=False, n=1)
        else:
            parsed = parse_body(ChatRequest if chat else CompletionRequest, body)
            if parsed.model not in state.openai_models():
                raise OpenAIError(404, f"The model '{parsed.model}' does not exist", param="model",
                                  code="model_not_found")
            payload = {**parsed.to_inferlet(), "prefix_cache": True}
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            run = _Run(state, request, tenant, state.completion_program, json.dumps(payload), chat, parsed.model,
                       exposed=False, stream=parsed.stream, include_usage=include_usage, n=parsed.n,
                       logprobs=payload["logprobs"] is not None)
        response = await run.respond()
        state.openai_requests[(endpoint, response.status_code)] += 1
        return response
    except ClientGone:
        state.openai_requests[(endpoint, CLIENT_CLOSED)] += 1
        return Response(status_code=CLIENT_CLOSED)
    except OpenAIError as e:
        state.openai_requests[(endpoint, e.status)] += 1
        state.count_error(e.body["error"]["code"] or e.body["error"]["type"])
        return JSONResponse(e.body, status_code=e.status)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _Run:
    """One request's instance, from launch to the response."""

    def __init__(self, state: Any, request: Request, tenant: str, program: Any, payload: str, chat: bool,
                 model: str, *, exposed: bool, stream: bool, include_usage: bool, n: int,
                 logprobs: bool = False) -> None:
        self.state, self.request, self.chat, self.model = state, request, chat, model
        self.exposed, self.stream, self.include_usage, self.n = exposed, stream, include_usage, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        try:
            self.record = state.registry.launch(tenant, program, [], owner=self)
        except ProtocolError as e:
            status, code = _LAUNCH_ERRORS.get(e.code, (400, e.code))
            raise OpenAIError(status, e.message, type="server_error" if status >= 500 else "invalid_request_error",
                              code=code) from None
        client = self.record.instance.client
        client.deliver(payload)
        client.close_input()
        self.texts = [""] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs = ChoiceLogprobs(n, chat, state.token_texts()) if logprobs else None
        self.usage: dict[str, Any] | None = None
        self._trailing = ""  # an exposed program's return value, sent after what it streamed
        self._events = self._event_stream()

    # ---- events from the instance ---------------------------------------------------
    async def _event_stream(self) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        buffer = self.record.buffer
        buffer.set_waker(lambda: loop.call_soon_threadsafe(wake.set))
        try:
            while True:
                await wake.wait()
                wake.clear()
                for event in buffer.take():
                    yield event
                    if event["event"] in TERMINAL_EVENTS:
                        return
        finally:
            buffer.set_waker(None)

    async def _next_update(self) -> tuple[str, Any]:
        """The next thing the client should hear: ("delta", (choice, text)), ("finish", choice),
        ("done", None) once usage is known; OpenAIError when the request failed."""
        while True:
            if not self.stream:
                event = await self._next_or_disconnect()
            else:
                event = await self._events.__anext__()
            kind, data = event["event"], event["data"]
            if kind == "message":
                update = self._message(data)
                if update is not None:
                    return update
            elif kind == "result":
                self._final(data)
                return "done", None
            elif kind == "error":
                raise OpenAIError(500, f"the completion program failed: {data['status']}: {data['message']}",
                                  type="server_error", code="inferlet_failed")
            # stdout/stderr lines of the program are not part of the completion

    async def _next_or_disconnect(self) -> dict[str, Any]:
        nxt = asyncio.ensure_future(self._events.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return nxt.result()
            if await self.request.is_disconnected():
                nxt.cancel()
                raise ClientGone()

    def _message(self, text: str) -> tuple[str, Any] | None:
        if self.exposed:
            self.texts[0] += text
            return "delta", (0, text)
        try:
            message = json.loads(text)
            kind = message["t"]
        except (ValueError, KeyError, TypeError):
            raise OpenAIError(500, f"the completion program sent {text[:200]!r}", type="server_error") from None
        if kind == "d":
            self.texts[message["i"]] += message["x"]
            return "delta", (message["i"], message["x"])
        if kind == "l" and self.logprobs is not None:
            self.logprobs.add(message["i"], message["p"])
            return None
        if kind == "f":
            self.finish[message["i"]] = message["r"]
            return "finish", message["i"]
        if kind == "e":
            raise OpenAIError(400, message["m"], param="messages" if self.chat else "prompt", code=message["c"])
        return None

    def _final(self, value: str) -> None:
        if self.exposed:
            if value:
                self.texts[0] += value
            self.finish[0] = "stop"
            tokenizer = self.state.runtime.engine.tokenizer
            completion = len(tokenizer.encode(self.texts[0]))
            self.usage = {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}
            self._trailing = value
            return
        usage = json.loads(value)
        self.usage = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
        }

    def abandon(self) -> None:
        self.state.registry.abandon(self.record, "its HTTP client went away")

    # ---- responses ------------------------------------------------------------------
    async def respond(self) -> Any:
        try:
            if not self.stream:
                while (await self._next_update())[0] != "done":
                    pass
                self.state.registry.forget(self.record)
                return JSONResponse(self._whole())
            # The first update decides between an error status and a stream.
            first = await self._next_update()
        except BaseException:
            self.abandon()
            raise
        return StreamingResponse(self._sse(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(self, first: tuple[str, Any]) -> AsyncIterator[str]:
        finished = False
        try:
            if self.chat:
                for i in range(self.n):
                    yield _sse(self._chunk(i, {"role": "assistant", "content": ""}, None))
            update = first
            while True:
                kind, data = update
                if kind == "delta":
                    index, text = data
                    yield _sse(self._chunk(index, {"content": text} if self.chat else text, None))
                elif kind == "finish":
                    yield _sse(self._chunk(data, {} if self.chat else "", self.finish[data]))
                elif kind == "done":
                    if self.exposed:
                        if self._trailing:
                            yield _sse(self._chunk(0, {"content": self._trailing} if self.chat else self._trailing, None))
                        yield _sse(self._chunk(0, {} if self.chat else "", "stop"))
                    if self.include_usage:
                        yield _sse({**self._envelope(), "choices": [], "usage": self.usage})
                    break
                update = await self._next_update()
            finished = True
            yield "data: [DONE]\n\n"
        except OpenAIError as e:
            finished = True
            yield _sse(e.body)
            yield "data: [DONE]\n\n"
        finally:
            if finished:
                self.state.registry.forget(self.record)
            else:  # the client went away mid-stream (the generator was closed)
                self.abandon()

    def _envelope(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, index: int, delta: Any, finish: str | None) -> dict[str, Any]:
        logprobs = self.logprobs.unsent(index) if self.logprobs is not None else None
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope(), "choices": [choice]}

    def _whole(self) -> dict[str, Any]:
        logprobs = [self.logprobs.whole(i) if self.logprobs is not None else None for i in range(self.n)]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs[i],
                        "finish_reason": self.finish[i] or "stop"} for i, text in enumerate(self.texts)]
            kind = "chat.completion"
        else:
            choices = [{"index": i, "text": text, "logprobs": logprobs[i], "finish_reason": self.finish[i] or "stop"}
                       for i, text in enumerate(self.texts)]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
