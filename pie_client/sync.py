"""A blocking wrapper around `PieClient`, for scripts:

    with SyncPieClient("ws://127.0.0.1:8080", token="...") as client:
        instance = client.launch(client.upload("app.wasm"), ["--prompt", "Hi"])
        for event in instance.events():
            print(event.kind, event.data)

The asyncio client runs on an event loop of its own, on a daemon thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Coroutine, Iterator, Sequence, TypeVar

from pie_client.client import Event, PieClient, Program, RemoteInstance

T = TypeVar("T")


class SyncInstance:
    def __init__(self, client: "SyncPieClient", remote: RemoteInstance) -> None:
        self._client = client
        self.remote = remote
        self.id = remote.id

    def events(self) -> Iterator[Event]:
        stream = self.remote.events()
        while True:
            try:
                yield self._client._call(stream.__anext__())
            except StopAsyncIteration:
                return

    def wait(self) -> str:
        return self._client._call(self.remote.wait())

    def send(self, message: str) -> None:
        self._client._call(self.remote.send(message))

    def close_input(self) -> None:
        self._client._call(self.remote.close_input())

    def terminate(self) -> None:
        self._client._call(self.remote.terminate())

    def detach(self) -> None:
        self._client._call(self.remote.detach())


class SyncPieClient:
    def __init__(self, url: str, token: str | None = None, *, open_timeout: float = 30.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pie-client", daemon=True)
        self._thread.start()
        self.client = PieClient(url, token, open_timeout=open_timeout)
        try:
            self._call(self.client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> "SyncPieClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tenant(self) -> str | None:
        return self.client.tenant

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def upload(self, program: str | os.PathLike[str] | bytes) -> Program:
        return self._call(self.client.upload(program))

    def launch(self, program: Program | str, arguments: Sequence[str] = ()) -> SyncInstance:
        return SyncInstance(self, self._call(self.client.launch(program, arguments)))

    def attach(self, instance_id: str) -> SyncInstance:
        return SyncInstance(self, self._call(self.client.attach(instance_id)))

    def list(self) -> list[dict[str, Any]]:
        return self._call(self.client.list())

    def close(self) -> None:
        try:
            self._call(self.client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
