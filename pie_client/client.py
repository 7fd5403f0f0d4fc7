"""An asyncio client for `pie-serve`.

    async with PieClient("ws://127.0.0.1:8080", token="...") as client:
        program = await client.upload("app.wasm")           # sent only if the server lacks it
        instance = await client.launch(program, ["--prompt", "Hi"])
        async for event in instance.events():
            print(event.kind, event.data)                   # message / stdout / stderr, then result or error

One connection carries every request and the events of every instance it
launched or attached. Leaving the `async with` block (or losing the
connection) terminates the instances not detached with `instance.detach()`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pie_client.protocol import PROTOCOL_VERSION, TERMINAL_EVENTS, WS_PATH, ProtocolError, decode, encode

UPLOAD_CHUNK_BYTES = 1024 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024


class PieClientError(Exception):
    """A request the server refused (`code` from pie_client.protocol.ERROR_CODES), or a lost connection."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Event:
    """Something an instance did: kind is message, stdout, stderr, result or error.

    `data` is the text for message/stdout/stderr, the returned string for
    result, and {"status", "message"} for error."""

    instance: str
    kind: str
    data: Any
    seq: int

    @property
    def final(self) -> bool:
        return self.kind in TERMINAL_EVENTS


@dataclass(frozen=True)
class Program:
    """A program the server holds: its sha256 (None for one registered by name) and manifest."""

    name: str
    sha256: str | None
    manifest: dict[str, Any] | None
    help: str | None

    @property
    def ref(self) -> str:
        return self.sha256 or self.name


class RemoteInstance:
    """An instance running on the server, streaming its events to this client."""

    def __init__(self, client: "PieClient", instance_id: str) -> None:
        self.client = client
        self.id = instance_id
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.outcome: Event | None = None

    async def events(self) -> AsyncIterator[Event]:
        """Its events in order, ending with its result or error event."""
        while self.outcome is None:
            event = await self._events.get()
            if event is None:
                raise self.client._lost or PieClientError("closed", "the connection was closed")
            if event.final:
                self.outcome = event
            yield event

    async def wait(self) -> str:
        """Its result (events before it are dropped); PieClientError if it failed."""
        async for _ in self.events():
            pass
        assert self.outcome is not None
        if self.outcome.kind == "error":
            raise PieClientError(self.outcome.data["status"], self.outcome.data["message"])
        return self.outcome.data

    async def send(self, message: str) -> None:
        await self.client._request("send", instance=self.id, message=message)

    async def close_input(self) -> None:
        await self.client._request("close_input", instance=self.id)

    async def terminate(self) -> None:
        await self.client._request("terminate", instance=self.id)

    async def detach(self) -> None:
        """It goes on running without this client; `PieClient.attach(id)` picks it up again."""
        await self.client._request("detach", instance=self.id)
        self.client._instances.pop(self.id, None)


class PieClient:
    def __init__(self, url: str, token: str | None = None, *, open_timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("PIE_TOKEN")
        self.open_timeout = open_timeout
        self.tenant: str | None = None
        self.server_info: dict[str, Any] = {}
        self._ws: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._instances: dict[str, RemoteInstance] = {}
        self._reader: asyncio.Task | None = None
        self._lost: PieClientError | None = None

    async def __aenter__(self) -> "PieClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        url = self.url if self.url.endswith(WS_PATH) else self.url + WS_PATH
        try:
            self._ws = await connect(url, max_size=MAX_FRAME_BYTES, open_timeout=self.open_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise PieClientError("unavailable", f"cannot connect to {url}: {e}") from None
        self._reader = asyncio.create_task(self._read())
        self.server_info = await self._request("hello", protocol=PROTOCOL_VERSION, token=self.token)
        self.tenant = self.server_info["tenant"]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    # ---- requests -------------------------------------------------------------------
    async def upload(self, program: str | os.PathLike[str] | bytes) -> Program:
        """Makes the server hold this component (a path or its bytes); sends it only if it lacks it."""
        data = program if isinstance(program, bytes) else Path(program).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        have = await self._request("has_program", sha256=sha256)
        if have["present"]:
            return _program(have["program"])
        upload = (await self._request("upload_begin", sha256=sha256, size=len(data)))["upload"]
        for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
            await self._request("upload_chunk", upload=upload, data=data[start:start + UPLOAD_CHUNK_BYTES])
        return _program((await self._request("upload_end", upload=upload))["program"])

    async def launch(self, program: Program | str, arguments: Sequence[str] = ()) -> RemoteInstance:
        """Starts an instance of an uploaded program (or one registered on the server by name)."""
        ref = program.ref if isinstance(program, Program) else program
        result = await self._request("launch", program=ref, arguments=list(arguments))
        return self._track(result["instance"])

    async def attach(self, instance_id: str) -> RemoteInstance:
        """Streams a detached instance's events here, starting with those buffered while it was detached."""
        instance = self._track(instance_id)
        try:
            await self._request("attach", instance=instance_id)
        except PieClientError:
            self._instances.pop(instance_id, None)
            raise
        return instance

    async def list(self) -> list[dict[str, Any]]:
        """This tenant's instances: id, program, state, status, age_seconds, attached."""
        return (await self._request("list"))["instances"]

    def _track(self, instance_id: str) -> RemoteInstance:
        instance = self._instances.get(instance_id)
        if instance is None:
            instance = self._instances[instance_id] = RemoteInstance(self, instance_id)
        return instance

    async def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._lost is not None:
            raise self._lost
        if self._ws is None:
            raise PieClientError("closed", "not connected (use `async with PieClient(...)`)")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._ws.send(encode({"id": request_id, "op": op, **fields}))
        except ConnectionClosed as e:
            self._pending.pop(request_id, None)
            raise PieClientError("closed", f"the connection was closed: {e}") from None
        return await future

    async def _read(self) -> None:
        try:
            async for data in self._ws:
                if isinstance(data, str):
                    continue
                try:
                    frame = decode(data)
                except ProtocolError:
                    continue
                if "event" in frame:
                    self._deliver(frame)
                    continue
                future = self._pending.pop(frame.get("id"), None)
                if future is None or future.done():
                    continue
                if frame.get("ok"):
                    future.set_result(frame.get("result") or {})
                else:
                    error = frame.get("error") or {}
                    future.set_exception(PieClientError(error.get("code", "internal"), error.get("message", "")))
            self._lost = PieClientError("closed", "the server closed the connection")
        except ConnectionClosed as e:
            self._lost = PieClientError("closed", f"the connection was lost: {e}")
        finally:
            if self._lost is None:
                self._lost = PieClientError("closed", "the connection was closed")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(self._lost)
            self._pending.clear()
            for instance in self._instances.values():
                instance._events.put_nowait(None)

    def _deliver(self, frame: dict[str, Any]) -> None:
        instance = self._instances.get(frame.get("instance"))
        if instance is None:
            return
        event = Event(frame["instance"], frame["event"], frame.get("data"), frame.get("seq", 0))
        instance._events.put_nowait(event)
        if event.final:
            self._instances.pop(event.instance, None)


def _program(info: dict[str, Any]) -> Program:
    return Program(info["name"], info.get("sha256"), info.get("manifest"), info.get("help"))
