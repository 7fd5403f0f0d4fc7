"""What the engine thread has done: the counters `ServingCore.stats` reports and pie-serve's metrics export."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ServingStats:
    """What the engine thread has done (a snapshot when read through `ServingCore.stats`)."""

    steps: int = 0
    batch_requests: Counter = field(default_factory=Counter)  # requests per step -> steps
    batch_tokens: Counter = field(default_factory=Counter)  # new tokens per step -> steps
    tokens_processed: int = 0  # input tokens run through the model
    tokens_generated: int = 0  # tokens drawn by Sample outputs
    forwards_completed: int = 0
    forwards_failed: int = 0
    # Chunked prefill (a token budget): forwards that ran over several steps, and their chunks.
    forwards_split: int = 0
    prefill_chunks: int = 0
    pages_copied_on_write: int = 0
    engine_seconds: float = 0.0  # wall time spent inside engine steps
    # Step wall times as a histogram: upper bound (STEP_SECONDS_BUCKETS, then inf) -> steps.
    step_seconds: Counter = field(default_factory=Counter)
    # Memory pressure (pie_runtime.pressure).
    alloc_waits: int = 0  # allocations that had to wait for pages
    alloc_wait_seconds: float = 0.0  # their total wait
    preemptions: int = 0  # instances swapped out to host memory
    pages_preempted: int = 0
    restores: int = 0
    paused_seconds: float = 0.0  # total time instances spent swapped out (ended or restored)
    exports_evicted: int = 0  # persistent exports dropped from the cache

    @property
    def max_batch_requests(self) -> int:
        return max(self.batch_requests, default=0)

    @property
    def mean_batch_requests(self) -> float:
        return sum(k * v for k, v in self.batch_requests.items()) / max(1, self.steps)

    def copy(self) -> "ServingStats":
        return dataclasses.replace(self, batch_requests=Counter(self.batch_requests),
                                   batch_tokens=Counter(self.batch_tokens), step_seconds=Counter(self.step_seconds))


@dataclass(frozen=True)
class StepEntry:
    """One request's share of an engine step (`ServingCore.recent_steps`)."""

    instance_id: str
    queue_id: int
    tokens: int  # new tokens it ran in the step
    chunk: tuple[int, int] | None  # (start, end) among its forward's tokens if the forward was split


STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def step_seconds_bucket(seconds: float) -> float:
    """The histogram bucket of a step's wall time: the first bound it does not exceed."""
    return next((bound for bound in STEP_SECONDS_BUCKETS if seconds <= bound), math.inf)
