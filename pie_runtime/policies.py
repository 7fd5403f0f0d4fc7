"""Batching policies: when to fire an engine step, and which ready forwards go in it.

Each policy sees the ready forwards (at most one per queue: a queue's next
forward depends on the KV its current one writes) and answers two questions:
`wait_time` (fire now, or how long to wait for more work) and `select` (which
of the ready forwards form the batch). The token budget and batch-size cap are
applied on top of every policy, highest priority first. The engine thread only
asks while the engine is idle.

The token budget bounds the new tokens of one step, so one step's latency is
bounded whatever arrives (chunked prefill): forwards that fit whole go first
(decoders bring a token or a few each), then forwards too long for what is
left get a chunk of it (`Ready.num_tokens` of the selected record says how
many tokens it runs this step; the scheduler splits the forward, see
`pie_runtime.chunking`). A long prompt therefore advances by about
budget - decoders tokens per step while everyone decoding keeps getting a
token per step.

- "adaptive" (default): fire once the *cohort* is back, i.e. every queue that
  ran in the previous step has either issued its next forward or gone away;
  if a member is slow (the inferlet is busy elsewhere), fire anyway after one
  step's latency (capped), since waiting longer costs more than the batch
  would gain. Firing the moment anything is ready ("greedy") fragments the
  batch: the first instance thread to wake after a step fires a tiny step,
  and the rest pay a whole extra step. Measured on CPU with 16 concurrent
  completions, greedy ran 2-3x more steps than there were tokens per request.
  The reference implementation reached the same design (cohort cap plus a
  one-step safety bound) after the same observation.
- "greedy": fire everything ready as soon as the engine is idle.
- "eager": one request per step, as soon as it is ready.
- "fixed-size": wait for `fixed_batch_size` ready forwards (or until every
  open instance is waiting, or `fixed_max_wait_s`).
- "fixed-timeout": fire `fixed_timeout_s` after the oldest ready forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

POLICIES = ("adaptive", "greedy", "eager", "fixed-size", "fixed-timeout")

# Tokens a plain decode loop draws per `queue.forward` call (the `decode-run`
# of `runtime.scheduling`) unless the operator says otherwise (`pie-run --decode-run`).
# Why 8: benchmarks/RESULTS.md, inferlet_overhead.py.
DEFAULT_DECODE_RUN = 8

# New tokens per engine step unless the operator says otherwise (`--token-budget`).
# Why 128: the smallest budget measured (benchmarks/mixed_load.py, RESULTS.md) at
# which a 512- or 2048-token prompt among 15 decoders is answered no later than
# with chunking off, on a 2-core CPU; the decoders' worst time per token fell to
# 0.16x / 0.07x. An accelerator, where a step's cost grows slowly with its
# tokens, would likely want more (not measured).
DEFAULT_TOKEN_BUDGET = 128


@dataclass(frozen=True)
class Ready:
    """A forward at the head of its queue."""

    queue_id: int
    instance_id: str
    priority: int
    num_tokens: int
    since: float  # monotonic time it became ready


@dataclass(frozen=True)
class Pacing:
    """What the engine thread knows about the recent past."""

    open_instances: int = 0
    # Queues that ran in the last step and have not issued their next forward yet.
    awaited: int = 0
    last_step_end: float = 0.0  # monotonic
    last_step_latency: float | None = None  # seconds; None before any step


@dataclass(frozen=True)
class BatchPolicy:
    name: str = "adaptive"
    token_budget: int | None = None  # max new tokens per step; longer forwards run in chunks (None = no cap)
    max_batch: int | None = None  # max requests per step (None = no cap)
    fixed_batch_size: int = 8
    fixed_timeout_s: float = 0.010
    # fixed-size only: a partial batch fires after this long, so a straggler
    # cannot wait forever for peers that are not coming.
    fixed_max_wait_s: float = 1.0
    # adaptive only: the most it waits for a slow cohort member (a step that
    # compiled a new shape must not make the next waits seconds long).
    adaptive_max_wait_s: float = 0.2

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown batching policy {self.name!r}; expected one of {POLICIES}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.fixed_batch_size < 1:
            raise ValueError(f"fixed_batch_size must be >= 1, got {self.fixed_batch_size}")
        if min(self.fixed_timeout_s, self.fixed_max_wait_s, self.adaptive_max_wait_s) < 0:
            raise ValueError("timeouts must be >= 0")

    def wait_time(self, ready: Sequence[Ready], now: float, pacing: Pacing) -> float | None:
        """0 = fire now; > 0 = wait at most this long for more work; None = nothing to do."""
        if not ready:
            return None
        if self.name in ("greedy", "eager"):
            return 0.0
        oldest = min(r.since for r in ready)
        if self.name == "adaptive":
            if pacing.awaited == 0 or pacing.last_step_latency is None or self._full(ready):
                return 0.0
            bound = min(pacing.last_step_latency, self.adaptive_max_wait_s)
            start = max(oldest, pacing.last_step_end)
            return max(0.0, start + bound - now)
        if self.name == "fixed-timeout":
            return max(0.0, oldest + self.fixed_timeout_s - now)
        # fixed-size: a full batch, or a partial one when every open instance
        # is already waiting on a forward (no one else can add work).
        waiting_instances = len({r.instance_id for r in ready})
        if len(ready) >= self.fixed_batch_size or waiting_instances >= pacing.open_instances:
            return 0.0
        return max(0.0, oldest + self.fixed_max_wait_s - now)

    def cohort_member_may_fire(self, num_tokens: int) -> bool:
        """Whether a forward of `num_tokens` from one of the last step's queues,
        with other members of that cohort still out, can make the policy fire
        before the rest come back (or the wait runs out): under the adaptive
        policy only if it fills a batch cap or, alone, the token budget. (A
        cohort that fills the budget only together waits for its last member,
        at most one step's latency.)"""
        if self.name != "adaptive" or self.max_batch is not None:
            return True
        return self.token_budget is not None and num_tokens >= self.token_budget

    def _full(self, ready: Sequence[Ready]) -> bool:
        """Waiting cannot grow the batch: the cap is reached, or forwards that fit
        whole fill the token budget (a longer one is chunked to what they leave,
        so one more decoder back still changes the batch)."""
        if self.max_batch is not None and len(ready) >= self.max_batch:
            return True
        budget = self.token_budget
        return budget is not None and sum(r.num_tokens for r in ready if r.num_tokens <= budget) >= budget

    def select(self, ready: Sequence[Ready]) -> list[Ready]:
        """The batch: highest priority first, then oldest. Under a token budget,
        the forwards that fit whole first (within a priority, the shortest
        first), then a chunk of what is left for the first that does not (its
        `num_tokens` cut to the chunk); a step always runs something."""
        ordered = sorted(ready, key=lambda r: (-r.priority, r.since, r.queue_id))
        cap = self.max_batch
        if self.name == "eager":
            cap = 1
        elif self.name == "fixed-size":
            cap = self.fixed_batch_size if cap is None else min(cap, self.fixed_batch_size)
        if cap is None:
            cap = len(ordered)
        if self.token_budget is None:
            return ordered[:cap]
        left = self.token_budget
        whole: list[Ready] = []
        # Within a priority, short forwards first: a decoder's token never waits for a prompt's tail.
        for r in sorted(ordered, key=lambda r: (-r.priority, r.num_tokens)):
            if len(whole) < cap and r.num_tokens <= left:
                whole.append(r)
                left -= r.num_tokens
        chunks: list[Ready] = []
        for r in ordered:
            if left == 0 or len(whole) + len(chunks) >= cap:
                break
            if r not in whole:
                chunks.append(dataclasses.replace(r, num_tokens=left))  # r.num_tokens > left
                left = 0
        return whole + chunks
