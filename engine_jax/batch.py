"""The engine's input and output records: the contract between the runtime and the engine.

A `ForwardRequest` is one sequence's share of an engine step. Its KV lives in
physical pages of the engine's pool; the sequence is
``(len(pages) - 1) * page_size + last_page_len`` slots long *after* the step,
and the new tokens' K/V are written into its last ``len(tokens)`` slots. A
token's RoPE position comes from ``positions`` and is independent of its slot.

Attention for a new token at slot ``s`` covers the sequence's slots ``j`` with
``j <= s`` (causal by slot) and ``slot_valid[j]`` (see ``Engine.set_valid``),
unless ``mask`` is given, in which case ``mask[i, j]`` replaces the causal
rule for token ``i`` (the valid bits still apply).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np


class EngineInputError(ValueError):
    """A request the engine cannot run: the message says which field and why."""


@dataclass(frozen=True)
class Sample:
    """Draw one token from the next-token distribution at input token ``index``."""

    index: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None = the engine's own random stream
    allowed: np.ndarray | None = None  # bool[vocab_size]; None = every token
    # None = the token only; n = also its log-probability and the n most likely tokens'
    # (a SampledToken): the model's own distribution (temperature 1, before filters and `allowed`).
    logprobs: int | None = None


# At most this many alternatives per sampled token (OpenAI's API caps top_logprobs at 20 too).
MAX_SAMPLE_LOGPROBS = 20


@dataclass(frozen=True)
class Distribution:
    """The ``k`` most likely next tokens at ``index`` and their probabilities."""

    index: int
    k: int
    temperature: float = 1.0


@dataclass(frozen=True)
class Logprobs:
    """Natural-log probabilities (temperature 1) of ``token_ids`` at ``index``."""

    index: int
    token_ids: tuple[int, ...]


OutputRequest = Union[Sample, Distribution, Logprobs]


@dataclass(frozen=True)
class SampledToken:
    """A drawn token with log-probabilities (a `Sample` with ``logprobs`` set)."""

    token: int
    logprob: float  # of `token`
    top_tokens: list[int]  # the most likely tokens, most likely first
    top_logprobs: list[float]

    def __int__(self) -> int:
        return self.token

# Results, one per output request and in the same order:
#   Sample       -> int (token id), or a SampledToken when its ``logprobs`` is set
#   Distribution -> (list[int] ids, list[float] probs), most likely first
#   Logprobs     -> list[float], one per requested token id
OutputResult = Union[int, SampledToken, tuple[list[int], list[float]], list[float]]


@dataclass
class ForwardRequest:
    tokens: Sequence[int]
    positions: Sequence[int]
    pages: Sequence[int]  # physical page ids, in sequence order
    last_page_len: int  # used slots of the last page after this step, 1..page_size
    mask: np.ndarray | None = None  # bool[len(tokens), kv_len]; True = may attend
    outputs: Sequence[OutputRequest] = field(default_factory=tuple)

    def sequence_length(self, page_size: int) -> int:
        return (len(self.pages) - 1) * page_size + self.last_page_len
