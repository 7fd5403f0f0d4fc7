"""Messages: instance <-> its client (send/receive) and instance <-> instance (broadcast/subscribe).

Both directions of waiting go through `concurrent.futures.Future`, the same
kind the serving core returns, so an inferlet can `poll` a receive, a
subscription and a forward pass together.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable

from pie_runtime.errors import PieError

# What `frame_line` escapes: every control character but tab (line feeds,
# carriage returns, terminal escape sequences) and the Unicode line and
# paragraph separators.
_UNFRAMED = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    ch = match.group()
    return _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def frame_line(text: str) -> str:
    r"""`text` as exactly one line of output: a line feed becomes `\n`, a
    carriage return `\r`, any other control character `\xNN` (or `\uNNNN`).
    A message from an inferlet then never prints a line of its own, so it
    cannot pass for another sender's. Text without control characters (JSON,
    for one) is unchanged; a backslash is left as it is, so `\n` in the
    output may also be those two characters as sent."""
    return _UNFRAMED.sub(_escape, text)


class Mailbox:
    """An ordered stream of strings with waiters: each `next()` future gets the next message.

    A waiter that is cancelled (its future resource was dropped) is skipped,
    so a dropped receive never swallows a message.
    """

    def __init__(self, closed_message: str) -> None:
        self._messages: deque[str] = deque()
        self._waiters: deque[Future] = deque()
        self._closed = False
        self._closed_message = closed_message
        self._lock = threading.Lock()

    def next(self) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._messages:
                fut.set_result(self._messages.popleft())
            elif self._closed:
                fut.set_exception(PieError.closed(self._closed_message))
            else:
                self._waiters.append(fut)
        return fut

    def put(self, message: str) -> bool:
        """Delivers a message; False if the mailbox is closed."""
        with self._lock:
            if self._closed:
                return False
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.set_running_or_notify_cancel():
                    waiter.set_result(message)
                    return True
            self._messages.append(message)
            return True

    def close(self) -> None:
        """No more messages: pending and future waiters resolve to `closed` once the backlog is read."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            if waiter.set_running_or_notify_cancel():
                waiter.set_exception(PieError.closed(self._closed_message))

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        with self._lock:
            return len(self._messages)


class ClientChannel:
    """The link between one instance and the client that launched it.

    `on_send` receives what the instance sends (the CLI prints it); without
    one, sent messages are kept in `sent`. The client feeds the instance with
    `deliver` and says it has no more to say with `close_input`.
    """

    def __init__(self, on_send: Callable[[str], None] | None = None) -> None:
        self._on_send = on_send
        self.sent: list[str] = []
        self._inbox = Mailbox("the client has no more messages")

    def send(self, message: str) -> None:
        if self._on_send is not None:
            self._on_send(message)
        else:
            self.sent.append(message)

    def receive(self) -> Future:
        return self._inbox.next()

    def deliver(self, message: str) -> None:
        self._inbox.put(message)

    def close_input(self) -> None:
        self._inbox.close()


class Subscription:
    """One instance's subscription to a topic of its namespace; `close` unsubscribes."""

    def __init__(self, broker: "Broker", namespace: str, topic: str) -> None:
        self.broker = broker
        self.namespace = namespace
        self.topic = topic
        self._mailbox = Mailbox(f"subscription to {topic!r} was closed")

    def next(self) -> Future:
        return self._mailbox.next()

    def _put(self, message: str) -> bool:
        return self._mailbox.put(message)

    def close(self) -> None:
        self.broker._unsubscribe(self)
        self._mailbox.close()


class Broker:
    """(namespace, topic) -> subscriptions, shared by all instances of one server.

    Topics are namespaced: a broadcast reaches only subscribers in the
    sender's namespace, so one user's instances can neither read nor inject
    another user's messages by guessing a topic name."""

    def __init__(self) -> None:
        self._topics: dict[tuple[str, str], set[Subscription]] = {}
        self._lock = threading.Lock()

    def subscribe(self, topic: str, namespace: str = "default") -> Subscription:
        sub = Subscription(self, namespace, topic)
        with self._lock:
            self._topics.setdefault((namespace, topic), set()).add(sub)
        return sub

    def broadcast(self, topic: str, message: str, namespace: str = "default") -> int:
        """Delivers to every current subscriber of `topic` in `namespace` (the
        sender's own included); returns how many."""
        with self._lock:
            subs = list(self._topics.get((namespace, topic), ()))
        return sum(1 for sub in subs if sub._put(message))

    def subscriber_count(self, topic: str | None = None, namespace: str = "default") -> int:
        """Subscribers of `topic` in `namespace`; with no topic, of every topic of every namespace."""
        with self._lock:
            if topic is not None:
                return len(self._topics.get((namespace, topic), ()))
            return sum(len(s) for s in self._topics.values())

    def _unsubscribe(self, sub: Subscription) -> None:
        key = (sub.namespace, sub.topic)
        with self._lock:
            subs = self._topics.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._topics[key]
