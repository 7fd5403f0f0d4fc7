"""The ASGI application of `pie-serve` and the state behind it.

The HTTP server comes up first and answers `/health` with 503 while the
model loads and the common step shapes compile on a worker thread; then the
serving core starts and every endpoint serves. On SIGTERM/SIGINT the server
drains: `/health` says 503, new instances are refused, running ones may
finish up to `--drain-seconds`, the rest are terminated (see `cli.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from pie_client.protocol import WS_PATH, ProtocolError
from pie_runtime.server import metrics
from pie_runtime.server.config import DEFAULT_TENANT
from pie_runtime.server.openai_schema import OpenAIError

log = logging.getLogger("pie_runtime.server")

SERVER_VERSION = "0.1.0"
COMPLETION_PROGRAM = Path(__file__).parent / "inferlets" / "openai_completion.py"
SWEEP_SECONDS = 30.0
MAX_MESSAGE_BYTES = 1 << 20


class ServerState:
    """Everything the endpoints share. `phase`: starting -> ready -> draining (or failed)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.version = SERVER_VERSION
        self.phase = "starting"
        self.failure: str | None = None
        self.process_lost = False  # a process of the multi-host engine died: the server exits (3)
        self.started_at = time.time()
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self.runtime: Any = None  # pie_runtime.options.Runtime
        self._token_texts: Any = None
        self.programs: Any = None  # programs.ProgramStore
        self.registry: Any = None  # sessions.InstanceRegistry
        self.completion_program: Any = None
        self.exposed: dict[str, Any] = {}  # OpenAI model name -> programs.StoredProgram
        self.errors: Counter = Counter()
        self.openai_requests: Counter = Counter()
        self.address = ""  # set once the socket is bound
        self.metrics = metrics.metrics_registry(self)

    # ---- start / stop ---------------------------------------------------------------
    def load(self) -> None:
        """Loads the model, compiles the common shapes, starts the core (blocking: a worker thread)."""
        from pie_runtime.options import instance_limits, load_engine, start_runtime, tenant_limits
        from pie_runtime.server.programs import ProgramStore, load_program_file
        from pie_runtime.server.sessions import InstanceRegistry
        from pie_runtime.server.warmup import warm_up
        from pie_runtime.host.capabilities import Capabilities

        s = self.settings
        allow = Capabilities.parse(s.allow)
        programs = ProgramStore(allow, s.max_upload_mb * 1024 * 1024, s.max_programs)
        for name, path in [(n, p) for n, _, p in (spec.partition("=") for spec in s.programs)]:
            programs.register_file(name.strip(), Path(path.strip()))
        self.completion_program = load_program_file("openai-completion", COMPLETION_PROGRAM, allow)
        for name, ref in s.expose.items():
            self.exposed[name] = programs.named_or_file(name, ref)
        built = load_engine(s, log.info, "pie-serve", on_lost=self._process_lost)
        warm_up(built.engine, s.warmup_batches, s.warmup_prompts, log.info)
        runtime = start_runtime(s, built, guest_output=self._guest_output, programs=programs.registered())
        self.registry = InstanceRegistry(
            runtime.host, instance_limits=instance_limits(s), max_instances=tenant_limits(s).max_instances,
            max_tenant_instances=s.max_tenant_instances, event_buffer_bytes=s.event_buffer_kb * 1024,
            keep_ended_seconds=s.keep_ended_seconds)
        self.programs = programs
        self.runtime = runtime
        self.phase = "ready"

    def _process_lost(self, message: str) -> None:
        """A process of the multi-host engine died: every instance fails, and the server exits."""
        log.error("pie-serve: %s", message)
        self.failure = message
        self.process_lost = True
        self.phase = "failed"
        if self.registry is not None:
            self.registry.terminate_all(message)

    def _guest_output(self, instance_id: str, stream: str, text: str) -> None:
        self.registry.guest_output(instance_id, stream, text)

    def begin_drain(self) -> None:
        self.phase = "draining"
        if self.registry is not None:
            self.registry.admitting = False

    def stop(self) -> None:
        if self.runtime is not None:
            self.registry.terminate_all("the server stopped")
            self.runtime.stop()

    # ---- what endpoints ask ---------------------------------------------------------
    def require_ready(self) -> "ServerState":
        if self.phase != "ready":
            reason = {"starting": "the server is starting (the model is loading)",
                      "draining": "the server is shutting down",
                      "failed": f"the server failed: {self.failure}"}[self.phase]
            raise ProtocolError("unavailable", reason)
        return self

    def tenant_for(self, token: Any) -> str:
        """The tenant a bearer token belongs to (any token, or none, without --auth)."""
        tokens = self.settings.tokens
        if tokens is None:
            return DEFAULT_TENANT
        if isinstance(token, str):
            for known, tenant in tokens.items():  # constant-time compare: no timing oracle on tokens
                if hmac.compare_digest(known.encode(), token.encode()):
                    return tenant
        raise ProtocolError("unauthenticated", "a valid bearer token is required (pie-serve --auth)")

    def http_tenant(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        try:
            return self.tenant_for(token)
        except ProtocolError as e:
            raise OpenAIError(401, e.message, code="invalid_api_key") from None

    def http_ready(self) -> None:
        try:
            self.require_ready()
        except ProtocolError as e:
            raise OpenAIError(503, e.message, type="server_error", code="server_unavailable") from None

    def model_names(self) -> list[str]:
        return [self.runtime.loaded.name] if self.runtime is not None else []

    def openai_models(self) -> list[str]:
        return self.model_names() + sorted(self.exposed)

    def exposed_program(self, name: str) -> Any | None:
        return self.exposed.get(name)

    def token_texts(self) -> Any:
        """The served model's token texts (for log-probabilities), built on first use."""
        if self._token_texts is None:
            from pie_runtime.server.openai_logprobs import TokenTexts

            self._token_texts = TokenTexts(self.runtime.engine.tokenizer)
        return self._token_texts

    def count_error(self, code: str) -> None:
        self.errors[code] += 1


def create_app(settings: Any) -> FastAPI:
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state))
        sweeper = asyncio.create_task(_sweep(state))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="pie-serve", version=SERVER_VERSION, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pie = state

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.phase == "ready" and state.runtime.core.running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state.phase, "detail": state.failure}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(state.metrics), media_type=metrics.CONTENT_TYPE)

    @app.websocket(WS_PATH)
    async def client_session(ws: WebSocket) -> None:
        from pie_runtime.server.connection import Connection

        await Connection(ws, state).run()

    from pie_runtime.server.openai_api import router

    app.include_router(router)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    return app


async def _load(state: ServerState) -> None:
    try:
        await asyncio.to_thread(state.load)
    except Exception as e:  # noqa: BLE001 - reported, and the server exits (cli.py watches the phase)
        log.exception("pie-serve: start-up failed")
        state.failure = f"{type(e).__name__}: {e}"
        state.phase = "failed"
        return
    for _ in range(100):  # the socket is normally bound long before the model has loaded
        if state.address:
            break
        await asyncio.sleep(0.1)
    engine = state.runtime.engine
    auth = (f"tokens for {len(set(state.settings.tokens.values()))} tenant(s)" if state.settings.tokens
            else "none (loopback only; every client is tenant 'default')")
    log.info("pie-serve: ready on %s: model %s, %d KV pages of %d slots, auth: %s",
             state.address or "(starting)", state.runtime.loaded.name, engine.num_pages, engine.page_size, auth)


async def _sweep(state: ServerState) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        if state.registry is not None:
            state.registry.sweep()
