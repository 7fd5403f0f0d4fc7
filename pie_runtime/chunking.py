"""Chunked prefill: a forward longer than the step's token budget runs as consecutive chunks, one per step.

A forward over `n` new tokens ending at sequence length `L` writes slots
`L - n .. L - 1`. Its chunk over tokens `[a, b)` is itself a forward: tokens
and positions `[a, b)` on the sequence cut to `L - (n - b)` slots (the pages
past that are not touched yet, the last one trimmed), the mask's rows
`[a, b)` cut to those slots, and the outputs whose index falls in `[a, b)`,
re-indexed from `a`. Run in order, the chunks compute what the whole forward
computes: a token attends to slots up to its own (causal), all written by its
own or an earlier chunk, with the same keys and values. A custom mask may let
a token see a later slot of the same forward; a chunk cannot end before such
a slot (see `ChunkPlan.end`), so such a forward splits only where it can, or
runs whole.

The scheduler keeps a chunked forward at the head of its queue until its last
chunk has run (the queue's later commands wait: FIFO holds), collects each
chunk's results in a `ChunkProgress` and settles the forward's future once,
with the results in the original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine_jax.batch import OutputResult

if TYPE_CHECKING:
    from .commands import ForwardCmd


@dataclass
class ChunkProgress:
    """How far a forward split into chunks has run."""

    tokens: tuple[int, ...]  # the tokens it runs (feed-previous already applied by the first chunk)
    done: int = 0  # new tokens already run
    chunks: int = 0  # chunks already run
    results: dict[int, OutputResult] = field(default_factory=dict)  # output index -> result

    def add(self, chunk: "Chunk", results: Sequence[OutputResult]) -> None:
        """Takes in a chunk that ran, with its results."""
        self.done, self.chunks = chunk.end, self.chunks + 1
        self.results.update(zip(chunk.output_indices, results))

    def results_in_order(self, num_outputs: int) -> list[OutputResult]:
        return [self.results[i] for i in range(num_outputs)]


@dataclass(frozen=True)
class Chunk:
    """One step's share of a forward: its tokens `[start, end)` as a forward on the virtual pages."""

    start: int
    end: int
    pages: tuple[int, ...]
    last_page_len: int
    mask: np.ndarray | None
    outputs: tuple[Any, ...]
    output_indices: tuple[int, ...]  # each output's index in the whole forward's outputs

    @staticmethod
    def all_of(cmd: ForwardCmd) -> "Chunk":
        return Chunk(0, len(cmd.tokens), cmd.pages, cmd.last_page_len, cmd.mask, cmd.outputs,
                     tuple(range(len(cmd.outputs))))

    def whole(self, cmd: ForwardCmd) -> bool:
        return self.start == 0 and self.end == len(cmd.tokens)

    def written_pages(self, page_size: int) -> list[int]:
        """The pages its new tokens' K/V go to (the ones that must be private)."""
        if self.end == self.start:
            return []
        seq_len = (len(self.pages) - 1) * page_size + self.last_page_len
        first = (seq_len - (self.end - self.start)) // page_size
        return list(self.pages[first:(seq_len - 1) // page_size + 1])


def next_chunk(cmd: ForwardCmd, limit: int, page_size: int) -> Chunk:
    """The part of `cmd` that runs next: the rest of it, or `limit` tokens' worth
    (more only where a custom mask forbids the split, see `ChunkPlan.end`)."""
    start = cmd.progress.done if cmd.progress is not None else 0
    n = len(cmd.tokens)
    if start == 0 and limit >= n:
        return Chunk.all_of(cmd)
    plan = ChunkPlan.of(cmd, page_size)
    return plan.chunk(cmd, start, plan.end(start, limit, n))


class ChunkPlan:
    """Where a forward may be split, computed once per command (`ChunkPlan.of`)."""

    def __init__(self, cmd: ForwardCmd, page_size: int) -> None:
        n = len(cmd.tokens)
        self.page_size = page_size
        self.total = (len(cmd.pages) - 1) * page_size + cmd.last_page_len
        first_slot = self.total - n
        if cmd.mask is None:
            self.cuts = None  # causal: a chunk may end anywhere
        else:
            # A chunk may end after token b only if no token before b sees a slot at or past b's own.
            seen = np.where(cmd.mask.any(axis=1), cmd.mask.shape[1] - 1 - np.argmax(cmd.mask[:, ::-1], axis=1), -1)
            reach = np.maximum.accumulate(seen)  # reach[b - 1]: the last slot tokens [0, b) see
            ends = np.arange(1, n + 1)
            self.cuts = ends[reach < first_slot + ends]

    @staticmethod
    def of(cmd: ForwardCmd, page_size: int) -> "ChunkPlan":
        if cmd.chunk_plan is None:
            cmd.chunk_plan = ChunkPlan(cmd, page_size)
        return cmd.chunk_plan

    def end(self, start: int, limit: int, n: int) -> int:
        """Where the chunk starting at `start` ends: as far as `limit` tokens allow, else
        at the first point past it where the mask allows a split (at worst the end)."""
        want = min(start + max(limit, 1), n)
        if self.cuts is None or want == n:
            return want
        i = int(np.searchsorted(self.cuts, want, side="right"))
        if i and self.cuts[i - 1] > start:
            return int(self.cuts[i - 1])
        return int(self.cuts[i])  # the end (n) is always a cut

    def chunk(self, cmd: ForwardCmd, start: int, end: int) -> Chunk:
        n, ps = len(cmd.tokens), self.page_size
        if start == 0 and end == n:
            return Chunk.all_of(cmd)
        seq_len = self.total - (n - end)
        used = -(-seq_len // ps)
        picked = [(i, o) for i, o in enumerate(cmd.outputs) if start <= o.index < end]
        return Chunk(
            start, end,
            pages=cmd.pages[:used],
            last_page_len=seq_len - (used - 1) * ps,
            mask=None if cmd.mask is None else cmd.mask[start:end, :seq_len],
            outputs=tuple(dataclasses.replace(o, index=o.index - start) for _, o in picked),
            output_indices=tuple(i for i, _ in picked),
        )
