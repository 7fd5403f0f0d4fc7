"""`pie-serve`: the long-running server (see `config.py` for its settings, docs/serving.md for its use).

uvicorn runs the ASGI app. Its signal handling is replaced by a drain: the
first SIGTERM/SIGINT stops admission (`/health` answers 503, launches are
refused), lets running instances finish for up to `--drain-seconds`, then
terminates what is left and exits 0. A second signal skips the wait.

With several processes (--num-processes), process 0 serves and the others
only follow it (`pie_runtime.options.follow`); when one of them dies, the
server terminates every instance with that error and exits with status 3.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Any, Sequence

import uvicorn

from pie_runtime.options import EXIT_PROCESS_LOST, exit_now, follow
from pie_runtime.server.app import create_app
from pie_runtime.server.config import ConfigError, parse_settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# After the drain deadline, how long terminated instances get to release what they hold.
TERMINATE_GRACE_SECONDS = 5.0
# The largest WebSocket frame a client may send (upload chunks are 1 MiB; see pie_client).
WS_MAX_FRAME_BYTES = 4 * 1024 * 1024

log = logging.getLogger("pie_runtime.server")


class PieServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = EXIT_OK
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.state.address = f"http://{host}:{port}"
            log.info("pie-serve: listening on %s (health: %s/health)", self.state.address, self.state.address)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not recorded for re-raising (uvicorn would re-raise it after shutdown): a drained exit is a clean 0.
        if self._loop is None or self.should_exit:
            self.should_exit = True
            return
        if self._drain is not None:  # a second signal: skip the rest of the wait
            log.info("pie-serve: second signal: terminating the remaining instances now")
            self._loop.call_soon_threadsafe(self._terminate_now)
            return
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit(name))

    def _terminate_now(self) -> None:
        if self.state.registry is not None:
            self.state.registry.terminate_all("the server is shutting down")

    async def _drain_then_exit(self, name: str) -> None:
        state = self.state
        state.begin_drain()
        registry = state.registry
        deadline = time.monotonic() + state.settings.drain_seconds
        running = registry.running() if registry is not None else []
        log.info("pie-serve: %s: draining; %d instance(s) running, waiting up to %.0fs", name, len(running),
                 state.settings.drain_seconds)
        while running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            running = registry.running()
        if running:
            log.info("pie-serve: terminating %d instance(s) still running", len(running))
            registry.terminate_all("the server is shutting down")
        # Their clients hear how each ended before the connections close.
        grace = time.monotonic() + TERMINATE_GRACE_SECONDS
        while registry is not None and (registry.running() or registry.streaming()) and time.monotonic() < grace:
            await asyncio.sleep(0.05)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.phase == "failed":
            self.exit_code = EXIT_PROCESS_LOST if self.state.process_lost else EXIT_FAILED
            return True
        return await super().on_tick(counter)


def _configure_logging(level: str) -> None:
    """Our lines at `level`; other libraries' (orbax, absl, jax) only when they warn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("pie_runtime")
    ours.setLevel(level.upper())
    ours.addHandler(handler)
    ours.propagate = False
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"pie-serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # argparse: --help, or a usage error it has printed
        return int(e.code or 0)
    _configure_logging(settings.log_level)
    if settings.process_id != 0:  # a follower of a multi-host engine: process 0 serves
        try:
            return follow(settings, log.info, log.error, "pie-serve")
        except Exception as e:  # noqa: BLE001 - unknown model, bad options: say so and stop
            log.error("pie-serve: cannot load model %s: %s", settings.model, e)
            return EXIT_USAGE
    if settings.tokens is None:
        log.info("pie-serve: no --auth: listening on %s only; every client is tenant 'default'", settings.host)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, lifespan="on", ws_max_size=WS_MAX_FRAME_BYTES,
                            timeout_graceful_shutdown=TERMINATE_GRACE_SECONDS)
    server = PieServer(config, app.state.pie)
    server.run()
    code = server.exit_code
    if app.state.pie.phase == "failed":
        code = EXIT_PROCESS_LOST if app.state.pie.process_lost else EXIT_FAILED
    if code and settings.num_processes > 1:
        exit_now(code)  # the distributed runtime's orderly shutdown would wait for (or abort on) a dead peer
    return code


if __name__ == "__main__":
    sys.exit(main())
