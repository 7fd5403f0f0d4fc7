"""Samplers and stop conditions. Pure Python: no binding imports.

Sampling itself happens on the device over the full vocabulary; a `Sampler`
only describes it. `Stop` decides when generation ends from the tokens and
text produced so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional, Sequence

_U64 = 1 << 64
MAX_LOGPROBS = 20  # alternatives per drawn token the contract reports at most


@dataclass(frozen=True)
class TokenLogprobs:
    """A drawn token's natural-log probability and the most likely tokens' (most likely first),
    under the model's own distribution (temperature 1, before filters)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampler:
    """How to draw each token. The defaults are greedy decoding.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: keep the smallest set of tokens whose probability reaches p (1 = off).
    min_p: drop tokens less likely than min_p times the most likely (0 = off).
    seed: reproducible draws; step i uses a seed derived from (seed, i), so
      the same seed and inputs give the same text while steps stay independent.
    allowed: BRLE over the vocabulary of the tokens that may be drawn.
    logprobs: None = tokens only; n (0..20) = also each drawn token's
      log-probability and the n most likely tokens' (the model's own
      distribution, before temperature and filters), in `Context.logprobs`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    allowed: Optional[tuple[int, ...]] = None
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < _U64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS} (or None), got {self.logprobs}")
        if self.allowed is not None and not isinstance(self.allowed, tuple):
            object.__setattr__(self, "allowed", tuple(self.allowed))

    # Presets -------------------------------------------------------------
    @classmethod
    def greedy(cls) -> "Sampler":
        """Always the most likely token."""
        return cls()

    @classmethod
    def random(cls, temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0, seed: Optional[int] = None) -> "Sampler":
        """Sampling from the (tempered, truncated) distribution."""
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)

    @classmethod
    def topk(cls, k: int, temperature: float = 1.0, seed: Optional[int] = None) -> "Sampler":
        return cls(temperature=temperature, top_k=k, seed=seed)

    @classmethod
    def topp(cls, p: float, temperature: float = 1.0, seed: Optional[int] = None) -> "Sampler":
        """Nucleus sampling."""
        return cls(temperature=temperature, top_p=p, seed=seed)

    @classmethod
    def minp(cls, p: float, temperature: float = 1.0, seed: Optional[int] = None) -> "Sampler":
        return cls(temperature=temperature, min_p=p, seed=seed)

    # ---------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def with_allowed(self, allowed: Optional[Sequence[int]]) -> "Sampler":
        """The same sampler restricted to `allowed` (a BRLE over the vocabulary)."""
        return replace(self, allowed=None if allowed is None else tuple(allowed))

    def step_seed(self, step: int) -> Optional[int]:
        """The seed for draw number `step` (None when unseeded)."""
        if self.seed is None:
            return None
        # splitmix64 of (seed, step): neighbouring steps get unrelated seeds.
        z = (self.seed + (step + 1) * 0x9E3779B97F4A7C15) % _U64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _U64
        return z ^ (z >> 31)

    def spec_fields(self, index: int, step: int) -> dict[str, Any]:
        """The fields of the contract's `sample-spec` for one draw."""
        return {
            "index": index,
            "temperature": float(self.temperature),
            "top_k": self.top_k,
            "top_p": float(self.top_p),
            "min_p": float(self.min_p),
            "seed": self.step_seed(step),
            "allowed": None if self.allowed is None else list(self.allowed),
            "logprobs": self.logprobs,
        }


@dataclass
class Stop:
    """When generation ends (whichever comes first).

    max_tokens: most tokens to generate.
    eos: stop at the model's end-of-sequence tokens (filled in by the
      context from the model info) and at `tokens`.
    strings: stop when the text contains one of these; the returned text
      ends before it.
    """

    max_tokens: int = 256
    strings: Sequence[str] = ()
    tokens: Iterable[int] = ()
    eos: bool = True
    _stop_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.strings = tuple(self.strings)
        if any(not s for s in self.strings):
            raise ValueError("stop strings must not be empty")
        self.tokens = tuple(self.tokens)
        self._stop_ids = frozenset(self.tokens)

    def bind(self, eos_tokens: Iterable[int]) -> "Stop":
        """A copy that also stops at the model's EOS tokens (when `eos`)."""
        bound = replace(self)
        if self.eos:
            bound._stop_ids = frozenset(self.tokens) | frozenset(eos_tokens)
        return bound

    @property
    def needs_text(self) -> bool:
        """True when checking requires the decoded text (stop strings)."""
        return bool(self.strings)

    def is_stop_token(self, token: int) -> bool:
        return token in self._stop_ids

    def check(self, generated: Sequence[int], text: Optional[str] = None) -> Optional[str]:
        """Why generation should stop now ('eos', 'stop-string', 'max-tokens'), or None.

        `generated` is every token drawn so far (the last one included);
        `text` is their decoded text, needed only when `needs_text`.
        """
        if generated and generated[-1] in self._stop_ids:
            return "eos"
        if self.strings and text is not None and self.find(text) >= 0:
            return "stop-string"
        if len(generated) >= self.max_tokens:
            return "max-tokens"
        return None

    def find(self, text: str) -> int:
        """Index of the earliest stop string in `text`, or -1."""
        hits = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(hits) if hits else -1

    def trim(self, text: str) -> str:
        """`text` cut before its first stop string."""
        cut = self.find(text)
        return text if cut < 0 else text[:cut]
