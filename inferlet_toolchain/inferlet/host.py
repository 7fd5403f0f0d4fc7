"""Runtime facts, child instances, client messaging, broadcast topics and the key-value store.

Thin wrappers over the `runtime`, `messaging` and `kvstore` interfaces with
async variants for waiting. Guest-only: imports the bindings.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from . import raw
from .errors import InferletError
from .loop import wait
from .model import call


def version() -> str:
    """The server's version."""
    return raw.runtime.version()


def instance_id() -> str:
    return raw.runtime.instance_id()


def arguments() -> list[str]:
    """The raw (already validated, canonical) argument list."""
    return list(raw.runtime.arguments())


def launch(arguments: Sequence[str] = (), program: str = "") -> str:
    """Runs a child instance to completion and returns its result string.

    `program` "" is this inferlet itself; another name must be a program the
    operator registered (`pie-run --program NAME=PATH`). Needs the "launch"
    capability. InferletError when the launch is refused or the child fails.
    """
    return _take(call(raw.runtime.launch, program, list(arguments)))


async def launch_async(arguments: Sequence[str] = (), program: str = "") -> str:
    """`launch` that lets other tasks run meanwhile: gather several to run children concurrently."""
    return await _take_async(call(raw.runtime.launch, program, list(arguments)))


def send(message: str) -> None:
    """Sends a message to the client that launched this instance."""
    call(raw.messaging.send, message)


def _take(future: Any) -> str:
    try:
        return call(future.get)
    finally:
        future.__exit__(None, None, None)


async def _take_async(future: Any) -> str:
    try:
        return await wait(future)
    except raw.Err as err:
        raise InferletError.from_wit(err.value) from None
    finally:
        future.__exit__(None, None, None)


def receive() -> str:
    """The next message from the client (blocks). InferletError 'closed' when it has no more."""
    return _take(raw.messaging.receive())


async def receive_async() -> str:
    return await _take_async(raw.messaging.receive())


def broadcast(topic: str, message: str) -> None:
    """Sends `message` to every current subscriber of `topic`."""
    call(raw.messaging.broadcast, topic, message)


class Subscription:
    """Messages broadcast on a topic after subscribing. Close it to unsubscribe."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.raw = call(raw.messaging.subscribe, topic)

    def next(self) -> str:
        return _take(self.raw.next())

    async def next_async(self) -> str:
        return await _take_async(self.raw.next())

    def close(self) -> None:
        self.raw.__exit__(None, None, None)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def subscribe(topic: str) -> Subscription:
    return Subscription(topic)


class store:
    """The key-value store shared by this user's instances."""

    @staticmethod
    def get(key: str) -> Optional[str]:
        return raw.kvstore.get(key)

    @staticmethod
    def set(key: str, value: str) -> None:
        """InferletError when the server refuses it (too large, or the store is full)."""
        call(raw.kvstore.set, key, value)

    @staticmethod
    def delete(key: str) -> bool:
        return raw.kvstore.delete(key)

    @staticmethod
    def keys(prefix: str = "") -> list[str]:
        return list(raw.kvstore.list_keys(prefix))
