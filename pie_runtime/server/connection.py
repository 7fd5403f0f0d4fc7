"""One client's WebSocket session (protocol in docs/protocol.md).

Requests are handled one after another, in the order they arrive; blocking
work (compiling an upload) runs on a worker thread so other connections go
on. One sender task writes every frame: replies first, then the events of
the instances this connection streams, each instance's in order. Instance
threads only append to their event buffers and wake the sender.

When the socket closes, instances the client did not detach are terminated
(everything they held is released by their teardown); detached ones run on
and can be attached again from another connection of the same tenant.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from pie_client.protocol import PROTOCOL_VERSION, TERMINAL_EVENTS, ProtocolError, decode, encode
from pie_runtime.server.sessions import ServerInstance

log = logging.getLogger("pie_runtime.server")

# Most uploads one connection may have open at once.
MAX_OPEN_UPLOADS = 4
# Queued after a reply that ends the session: the sender closes the socket there.
_CLOSE: dict[str, Any] = {}


class Connection:
    def __init__(self, ws: WebSocket, state: Any) -> None:
        self.ws = ws
        self.state = state  # pie_runtime.server.app.ServerState
        self.tenant: str | None = None
        self.loop = asyncio.get_running_loop()
        self._replies: deque[dict[str, Any]] = deque()
        self._streams: dict[str, ServerInstance] = {}  # instance id -> instance whose events go here
        self._wake = asyncio.Event()
        self._uploads: dict[int, Any] = {}
        self._next_upload = 1
        self._hanging_up = False

    # ---- lifetime -----------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        sender = asyncio.create_task(self._send_loop())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if self._hanging_up:  # after a failed hello nothing more is read
                    continue
                if data is None:
                    self._reply_error(None, ProtocolError("bad-request", "frames must be binary MessagePack maps"))
                    continue
                await self._handle(data)
        except WebSocketDisconnect:
            pass
        finally:
            self._abandon_streams()
            self._uploads.clear()
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the socket is gone either way
                pass

    def _abandon_streams(self) -> None:
        """The client left without detaching: its instances end, and are forgotten once they have."""
        for record in list(self._streams.values()):
            record.buffer.set_waker(None)
            record.owner = None
            self.state.registry.abandon(record, "its client disconnected")
        self._streams.clear()

    # ---- requests -----------------------------------------------------------------
    async def _handle(self, data: bytes) -> None:
        request_id = None
        try:
            frame = decode(data)
            request_id = frame.get("id")
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                raise ProtocolError("bad-request", "every request needs an integer id")
            op = frame.get("op")
            if op == "hello":
                result = self._hello(frame)
            elif self.tenant is None:
                raise ProtocolError("unauthenticated", "the first request must be hello")
            else:
                handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
                if handler is None:
                    raise ProtocolError("bad-request", f"unknown op {op!r}")
                result = handler(frame)
                if asyncio.iscoroutine(result):
                    result = await result
            self._reply(request_id, result)
        except ProtocolError as e:
            self._reply_error(request_id, e)
            if e.code == "unauthenticated":  # say why, then hang up (policy violation)
                self._replies.append(_CLOSE)
                self._hanging_up = True
        except Exception as e:  # noqa: BLE001 - a server bug: report it, keep serving
            log.exception("request failed")
            self._reply_error(request_id, ProtocolError("internal", f"{type(e).__name__}: {e}"))

    def _hello(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self.tenant is not None:
            raise ProtocolError("bad-request", "hello was already said on this connection")
        if frame.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError("bad-request", f"this server speaks protocol {PROTOCOL_VERSION}, "
                                               f"the client asked for {frame.get('protocol')!r}")
        token = frame.get("token")
        header = self.ws.headers.get("authorization", "")
        if token is None and header.lower().startswith("bearer "):
            token = header[7:].strip()
        self.tenant = self.state.tenant_for(token)
        state = self.state
        return {
            "protocol": PROTOCOL_VERSION,
            "server": state.version,
            "tenant": self.tenant,
            "models": state.model_names(),
            "max_upload_bytes": state.programs.max_bytes if state.programs is not None else 0,
            "ready": state.phase == "ready",
        }

    def _op_has_program(self, frame: dict[str, Any]) -> dict[str, Any]:
        stored = self.state.require_ready().programs.has(self.tenant, frame.get("sha256"))
        return {"present": stored is not None, "program": stored.describe() if stored is not None else None}

    def _op_upload_begin(self, frame: dict[str, Any]) -> dict[str, Any]:
        programs = self.state.require_ready().programs
        if len(self._uploads) >= MAX_OPEN_UPLOADS:
            raise ProtocolError("limit", f"{MAX_OPEN_UPLOADS} uploads are already open on this connection")
        upload = programs.begin_upload(self.tenant, frame.get("sha256"), frame.get("size"))
        upload_id, self._next_upload = self._next_upload, self._next_upload + 1
        self._uploads[upload_id] = upload
        return {"upload": upload_id}

    def _upload(self, frame: dict[str, Any]) -> Any:
        upload = self._uploads.get(frame.get("upload"))
        if upload is None:
            raise ProtocolError("not-found", f"no open upload {frame.get('upload')!r} on this connection")
        return upload

    def _op_upload_chunk(self, frame: dict[str, Any]) -> dict[str, Any]:
        upload = self._upload(frame)
        try:
            received = self.state.programs.add_chunk(upload, frame.get("data"))
        except ProtocolError:
            self._uploads.pop(frame.get("upload"), None)  # an oversize upload is over
            raise
        return {"received": received}

    async def _op_upload_end(self, frame: dict[str, Any]) -> dict[str, Any]:
        upload = self._upload(frame)
        del self._uploads[frame.get("upload")]
        stored = await asyncio.to_thread(self.state.programs.finish_upload, upload)
        return {"program": stored.describe()}

    def _op_launch(self, frame: dict[str, Any]) -> dict[str, Any]:
        state = self.state.require_ready()
        stored = state.programs.resolve(self.tenant, frame.get("program"))
        record = state.registry.launch(self.tenant, stored, frame.get("arguments", []), owner=self)
        # The reply goes out before any event of the instance: the sender writes replies first.
        self._stream(record)
        return {"instance": record.instance_id, "program": stored.program.name}

    def _op_send(self, frame: dict[str, Any]) -> dict[str, Any]:
        record = self.state.registry.get(self.tenant, frame.get("instance"))
        message = frame.get("message")
        if not isinstance(message, str):
            raise ProtocolError("bad-request", "message must be a string")
        if len(message) > self.state.max_message_bytes:
            raise ProtocolError("too-large", f"a message may be at most {self.state.max_message_bytes} bytes")
        if record.ended_at is not None:
            raise ProtocolError("invalid-argument", f"instance {record.instance_id} has ended")
        record.instance.client.deliver(message)
        return {}

    def _op_close_input(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.state.registry.get(self.tenant, frame.get("instance")).instance.client.close_input()
        return {}

    def _op_terminate(self, frame: dict[str, Any]) -> dict[str, Any]:
        record = self.state.registry.get(self.tenant, frame.get("instance"))
        record.instance.terminate("terminated by the client")
        return {}

    def _op_list(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"instances": self.state.registry.list(self.tenant)}

    def _op_detach(self, frame: dict[str, Any]) -> dict[str, Any]:
        record = self.state.registry.get(self.tenant, frame.get("instance"))
        if self._streams.pop(record.instance_id, None) is None:
            raise ProtocolError("invalid-argument", f"instance {record.instance_id} is not attached here")
        record.buffer.set_waker(None)
        record.owner = None
        return {}

    def _op_attach(self, frame: dict[str, Any]) -> dict[str, Any]:
        record = self.state.registry.get(self.tenant, frame.get("instance"))
        if record.owner is not None and record.owner is not self:
            raise ProtocolError("invalid-argument",
                                f"instance {record.instance_id} is attached to another client; it must detach first")
        record.owner = self
        self._stream(record)
        return {"instance": record.instance_id, "state": record.describe()["state"]}

    # ---- frames out ---------------------------------------------------------------
    def _stream(self, record: ServerInstance) -> None:
        self._streams[record.instance_id] = record
        record.buffer.set_waker(self._wake_threadsafe)

    def _wake_threadsafe(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop has closed: the server is gone
            pass

    def _reply(self, request_id: int, result: dict[str, Any]) -> None:
        self._replies.append({"id": request_id, "ok": True, "result": result})
        self._wake.set()

    def _reply_error(self, request_id: Any, error: ProtocolError) -> None:
        self.state.count_error(error.code)
        self._replies.append({"id": request_id, "ok": False,
                              "error": {"code": error.code, "message": error.message}})
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_pending()

    async def _send_pending(self) -> None:
        while self._replies:
            reply = self._replies.popleft()
            if reply is _CLOSE:
                self._replies.clear()
                self._streams.clear()
                await self.ws.close(1008)
                return
            await self.ws.send_bytes(encode(reply))
        for instance_id, record in list(self._streams.items()):
            for event in record.buffer.take():
                event["instance"] = instance_id
                await self.ws.send_bytes(encode(event))
                if event["event"] in TERMINAL_EVENTS:
                    self._streams.pop(instance_id, None)
                    record.buffer.set_waker(None)
                    record.owner = None
                    self.state.registry.forget(record)
