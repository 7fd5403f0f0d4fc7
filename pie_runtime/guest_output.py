"""A guest's stdout and stderr, as lines for the host's guest-output sink: bounded and linear-time.

Whatever a guest writes (no line breaks at all, megabytes at a time, one byte
per write), each write is scanned once, a line is cut every
`TenantLimits.output_line_bytes` bytes and, once the instance's
`TenantLimits.output_bytes` are spent (stdout and stderr together), the rest
is dropped with one notice. Memory held per stream: at most one line.
"""

from __future__ import annotations

import threading
from typing import Callable


class OutputBudget:
    """Bytes of stdout and stderr one instance may still emit, together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit
        self.dropped = 0
        self.lock = threading.Lock()

    def take(self, size: int) -> bool | None:
        """True: emit `size` bytes. False: drop them. None: drop them, and this
        is the first drop (say so once)."""
        with self.lock:
            if size <= self.left:
                self.left -= size
                return True
            first = self.dropped == 0
            self.left = 0
            self.dropped += size
            return None if first else False


class LineSink:
    """Splits a guest's byte stream into lines for the guest-output sink.

    Linear time and bounded memory, whatever the guest writes: each write is
    scanned once, a line is cut every `max_line` bytes, and once the
    instance's `budget` is spent the rest is dropped (with one notice)."""

    def __init__(self, emit: Callable[[str], None], budget: OutputBudget, max_line: int) -> None:
        self._emit = emit
        self._budget = budget
        self._max_line = max(1, max_line)
        self._buffer = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        lines: list[bytes] = []
        with self._lock:
            *complete, rest = data.split(b"\n")
            for piece in complete:
                self._buffer += piece
                lines.extend(self._cut())
                lines.append(bytes(self._buffer))
                self._buffer.clear()
            self._buffer += rest
            lines.extend(self._cut())
        for line in lines:
            self._send(line)

    def _cut(self) -> list[bytes]:
        """Whole `max_line` pieces off the front of the buffer (a line too long to keep whole)."""
        size = self._max_line
        whole = (len(self._buffer) - 1) // size * size  # leaves 1..size bytes (one delete: linear)
        if whole <= 0:
            return []
        pieces = [bytes(self._buffer[i:i + size]) for i in range(0, whole, size)]
        del self._buffer[:whole]
        return pieces

    def _send(self, line: bytes) -> None:
        verdict = self._budget.take(len(line) + 1)
        if verdict:
            self._emit(line.decode("utf-8", "replace"))
        elif verdict is None:
            self._emit(f"[output limit of {self._budget.limit} bytes reached: the rest of this instance's "
                       "output is dropped]")

    def flush(self) -> None:
        with self._lock:
            rest = bytes(self._buffer)
            self._buffer.clear()
        if rest:
            self._send(rest)
