"""Queued commands and the per-queue FIFO that holds them.

A command is validated when it is enqueued (so the inferlet gets bad-input
errors synchronously) and takes effect when it reaches the head of its queue
and the scheduler runs it. Only the scheduler thread pops commands.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from engine_jax.batch import OutputRequest

from .errors import PieError
from .exports import Export


@dataclass
class ForwardCmd:
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    pages: tuple[int, ...]  # virtual ids of the issuing instance
    last_page_len: int
    mask: np.ndarray | None
    outputs: tuple[OutputRequest, ...]
    # The first token is the one the queue's previous forward drew (feed-previous).
    feeds_previous: bool = False
    future: Future = field(default_factory=Future)
    # Split over steps by the token budget (`pie_runtime.chunking`): where it may
    # be split (a ChunkPlan, computed on first need) and how far it has run (a
    # ChunkProgress, once its first chunk ran; None while it has not started).
    chunk_plan: Any = None
    progress: Any = None

    def remaining(self) -> int:
        """New tokens still to run."""
        return len(self.tokens) - (self.progress.done if self.progress is not None else 0)


@dataclass
class FreeCmd:
    pages: tuple[int, ...]


@dataclass
class CopySlotsCmd:
    src: int
    src_offset: int
    dst: int
    dst_offset: int
    count: int


@dataclass
class MaskSlotsCmd:
    page: int
    offset: int
    count: int
    masked: bool


@dataclass
class PublishExportCmd:
    export: Export


@dataclass
class SyncCmd:
    future: Future = field(default_factory=Future)


Command = Union[ForwardCmd, FreeCmd, CopySlotsCmd, MaskSlotsCmd, PublishExportCmd, SyncCmd]

_queue_ids = itertools.count()


class CommandQueue:
    """One inferlet queue's FIFO plus what the scheduler needs to order it."""

    def __init__(self, instance_id: str, priority: int) -> None:
        self.id = next(_queue_ids)  # creation order breaks priority ties
        self.instance_id = instance_id
        self.priority = priority
        self.commands: deque[Command] = deque()
        self.closed = False  # no new commands; the queue goes away once drained
        # When the current head became the head: the batching timeout counts from here.
        self.head_since = time.monotonic()
        # A command without a future (copy, mask, ...) that failed at run time:
        # reported by the next command on this queue that has a future.
        self.deferred_error: PieError | None = None
        # The token the last forward that ran on this queue drew (its last
        # sample output); None if it drew none or failed. Feeds feed-previous.
        self.last_drawn: int | None = None

    def push(self, cmd: Command) -> None:
        if not self.commands:
            self.head_since = time.monotonic()
        self.commands.append(cmd)

    def head(self) -> Command | None:
        return self.commands[0] if self.commands else None

    def pop(self) -> Command:
        cmd = self.commands.popleft()
        self.head_since = time.monotonic()
        return cmd

    def drained(self) -> bool:
        return not self.commands


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolves a future unless it is already resolved (an instance closed
    while its forward was in flight: the future already says `closed`)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError: lost a race with a concurrent close
        pass


def command_futures(cmds: Sequence[Command]) -> list[Future]:
    return [c.future for c in cmds if isinstance(c, (ForwardCmd, SyncCmd))]
