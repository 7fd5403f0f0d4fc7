"""Instances launched through the server: who owns each, its buffered events, admission and clean-up.

Every instance belongs to one tenant and is invisible to the others (an id
of another tenant's instance is "not found"). Its events (messages it sends,
stdout/stderr lines, then exactly one `result` or `error`) go into its own
bounded `EventBuffer`, which the client streaming it drains. A slow reader,
or none at all (a detached instance), never makes the server drop an event
or grow without bound: once the buffer is full, the instance's next output
waits (its thread blocks) until there is room, or until it is terminated.
The final event is never held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pie_client.protocol import ProtocolError
from pie_runtime.errors import PieError

log = logging.getLogger("pie_runtime.server")

# An event's cost against the buffer bound, beyond its text.
EVENT_OVERHEAD_BYTES = 64
# How often a producer waiting for room re-checks whether its instance was stopped.
FULL_POLL_SECONDS = 0.05


class EventBuffer:
    """The ordered events of one instance, bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._events: deque[dict[str, Any]] = deque()
        self._bytes = 0
        self._seq = 0
        self._cv = threading.Condition()
        self._waker: Callable[[], None] | None = None

    def put(self, kind: str, data: Any, *, stopped: Callable[[], bool] = lambda: False, force: bool = False) -> None:
        """Appends an event; waits while the buffer is full (unless `force`, or the instance was stopped)."""
        size = EVENT_OVERHEAD_BYTES + (len(data) if isinstance(data, str) else 0)
        with self._cv:
            while not force and self._events and self._bytes + size > self.max_bytes and not stopped():
                self._cv.wait(FULL_POLL_SECONDS)
            self._seq += 1
            self._events.append({"event": kind, "seq": self._seq, "data": data})
            self._bytes += size
            waker = self._waker
        if waker is not None:
            waker()

    def take(self) -> list[dict[str, Any]]:
        """Every buffered event, oldest first; frees their room."""
        with self._cv:
            events, self._events, self._bytes = list(self._events), deque(), 0
            self._cv.notify_all()
        return events

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """`waker` is called (from any thread) whenever an event arrives; at once if some are waiting."""
        with self._cv:
            self._waker = waker
            pending = bool(self._events)
        if waker is not None and pending:
            waker()

    def __len__(self) -> int:
        with self._cv:
            return len(self._events)


@dataclass
class ServerInstance:
    """One instance as the server tracks it."""

    instance_id: str
    tenant: str
    program: str  # its name (manifest) for listings
    instance: Any  # pie_runtime.instance.Instance
    buffer: EventBuffer
    created: float = field(default_factory=time.time)
    owner: Any | None = None  # the stream its events go to (a connection or an HTTP request); None = detached
    ended_at: float | None = None  # time.monotonic() when its final event was buffered
    status: str = "running"  # then the outcome's status: ok, error, trap, cpu-limit, terminated, start-failed
    forget_when_ended: bool = False  # nobody will collect its outcome (its client left)

    def stopped(self) -> bool:
        return self.instance.context.stopped.done()

    def describe(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "program": self.program,
            "state": "running" if self.ended_at is None else "ended",
            "status": self.status,
            "age_seconds": round(time.time() - self.created, 3),
            "attached": self.owner is not None,
        }


class InstanceRegistry:
    """Admits, tracks and forgets the server's instances."""

    def __init__(self, host: Any, *, instance_limits: Any, max_instances: int, max_tenant_instances: int,
                 event_buffer_bytes: int, keep_ended_seconds: float) -> None:
        self.host = host
        self.instance_limits = instance_limits
        self.max_instances = max_instances
        self.max_tenant_instances = max_tenant_instances
        self.event_buffer_bytes = event_buffer_bytes
        self.keep_ended_seconds = keep_ended_seconds
        self.admitting = True
        self._records: dict[str, ServerInstance] = {}
        self._lock = threading.Lock()
        self.outcomes: Counter = Counter()  # status -> instances that ended so

    # ---- launch -------------------------------------------------------------------
    def launch(self, tenant: str, stored: Any, arguments: Sequence[str], owner: Any) -> ServerInstance:
        """Starts an instance of `stored` (programs.StoredProgram) for `tenant`, streaming to `owner`."""
        from pie_runtime.instance import Instance, new_instance_id
        from pie_runtime.messaging import ClientChannel

        if not isinstance(arguments, (list, tuple)) or not all(isinstance(a, str) for a in arguments):
            raise ProtocolError("bad-request", "arguments must be a list of strings")
        program = stored.program
        try:
            checked = program.check_arguments(list(arguments))
        except PieError as e:
            raise ProtocolError("invalid-argument", str(e).removeprefix("invalid-argument: ")) from None
        instance_id = new_instance_id()
        buffer = EventBuffer(self.event_buffer_bytes)
        with self._lock:
            self._admit(tenant)
            client = ClientChannel(on_send=lambda text: buffer.put("message", text, stopped=record.stopped))
            instance = Instance(self.host, program.component, arguments=checked, instance_id=instance_id,
                                client=client, namespace=tenant, limits=self.instance_limits,
                                grant=program.grant, program_name=program.name, manifest=program.manifest)
            record = ServerInstance(instance_id, tenant, program.name, instance, buffer, owner=owner)
            self._records[instance_id] = record
        instance.outcome.add_done_callback(lambda done: self._ended(record, done.result()))
        try:
            instance.start()
        except PieError as e:  # past an operator's limit (live instances, launch-tree memory)
            with self._lock:
                self._records.pop(instance_id, None)
            raise ProtocolError("limit", e.message) from None
        return record

    def _admit(self, tenant: str) -> None:
        if not self.admitting:
            raise ProtocolError("unavailable", "the server is shutting down and admits no new instances")
        running = [r for r in self._records.values() if r.ended_at is None]
        if len(running) >= self.max_instances:
            raise ProtocolError("limit", f"the server runs {len(running)} instances, its limit "
                                         "(--max-instances); try again when one has ended")
        mine = sum(1 for r in running if r.tenant == tenant)
        if mine >= self.max_tenant_instances:
            raise ProtocolError("limit", f"tenant {tenant!r} runs {mine} instances, its limit "
                                         "(--max-tenant-instances); try again when one has ended")

    def _ended(self, record: ServerInstance, outcome: Any) -> None:
        record.status = outcome.status
        with self._lock:
            self.outcomes[outcome.status] += 1
        if outcome.ok:
            record.buffer.put("result", outcome.value or "", force=True)
        else:
            record.buffer.put("error", {"status": outcome.status, "message": outcome.error or ""}, force=True)
        with self._lock:
            record.ended_at = time.monotonic()
            if record.forget_when_ended:
                self._records.pop(record.instance_id, None)

    # ---- lookups ------------------------------------------------------------------
    def get(self, tenant: str, instance_id: Any) -> ServerInstance:
        if not isinstance(instance_id, str):
            raise ProtocolError("bad-request", "instance must be a string id")
        with self._lock:
            record = self._records.get(instance_id)
        if record is None or record.tenant != tenant:  # another tenant's instance does not exist for this one
            raise ProtocolError("not-found", f"no instance {instance_id!r}")
        return record

    def list(self, tenant: str) -> list[dict[str, Any]]:
        with self._lock:
            records = [r for r in self._records.values() if r.tenant == tenant]
        return [r.describe() for r in sorted(records, key=lambda r: r.created)]

    def guest_output(self, instance_id: str, stream: str, text: str) -> None:
        """The host's sink for guest stdout/stderr lines."""
        with self._lock:
            record = self._records.get(instance_id)
        if record is None:  # a child instance: its lines go to the server log
            log.info("[%s %s] %s", instance_id, stream, text[:1000])
            return
        record.buffer.put(stream, text, stopped=record.stopped)

    # ---- ends ---------------------------------------------------------------------
    def forget(self, record: ServerInstance) -> None:
        """Drops an ended instance whose final event was delivered."""
        with self._lock:
            self._records.pop(record.instance_id, None)

    def abandon(self, record: ServerInstance, reason: str) -> None:
        """Its client is gone: terminate it (if it still runs) and forget it once it has ended."""
        with self._lock:
            record.forget_when_ended = True
            ended = record.ended_at is not None
            if ended:
                self._records.pop(record.instance_id, None)
        if not ended:
            record.instance.terminate(reason)

    def sweep(self) -> None:
        """Forgets ended, detached instances nobody collected within keep_ended_seconds."""
        now = time.monotonic()
        with self._lock:
            stale = [r for r in self._records.values()
                     if r.ended_at is not None and r.owner is None and now - r.ended_at > self.keep_ended_seconds]
            for record in stale:
                del self._records[record.instance_id]

    def terminate_all(self, reason: str) -> None:
        with self._lock:
            records = list(self._records.values())
        for record in records:
            if record.ended_at is None:
                record.instance.terminate(reason)

    def streaming(self) -> list[ServerInstance]:
        """Instances whose client has not been sent their final event yet."""
        with self._lock:
            return [r for r in self._records.values() if r.owner is not None]

    def running(self) -> list[ServerInstance]:
        with self._lock:
            return [r for r in self._records.values() if r.ended_at is None]

    def counts(self) -> tuple[Counter, Counter]:
        """(instances by state, running instances by tenant) for the metrics."""
        with self._lock:
            records = list(self._records.values())
        by_state: Counter = Counter()
        by_tenant: Counter = Counter()
        for r in records:
            if r.ended_at is not None:
                by_state["ended"] += 1
            else:
                by_state["running" if r.owner is not None else "detached"] += 1
                by_tenant[r.tenant] += 1
        return by_state, by_tenant

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
