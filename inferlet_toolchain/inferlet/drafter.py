"""Drafters for speculative decoding. Pure Python: no binding imports.

A drafter proposes the next few tokens cheaply; `Context.generate(...,
drafter=d)` verifies a whole draft in one forward pass and keeps the longest
prefix the model agrees with (plus the model's own next token), so every step
yields at least one token and the output is exactly what the sampler alone
would have produced.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Drafter(Protocol):
    """Anything with `draft(history) -> proposed next tokens`."""

    def draft(self, history: Sequence[int]) -> list[int]:
        """Proposed continuation of `history` (may be empty)."""
        ...


class NgramDrafter:
    """Proposes what followed the most recent earlier occurrence of the last n tokens.

    Cheap and effective on repetitive text (code, quoting the prompt).
    """

    def __init__(self, n: int = 3, max_draft: int = 4) -> None:
        if n < 1 or max_draft < 1:
            raise ValueError("n and max_draft must be >= 1")
        self.n = n
        self.max_draft = max_draft

    def draft(self, history: Sequence[int]) -> list[int]:
        n = self.n
        if len(history) <= n:
            return []
        key = list(history[-n:])
        # Scan backwards so the most recent match wins.
        for start in range(len(history) - n - 1, -1, -1):
            if list(history[start:start + n]) == key:
                follow = history[start + n:start + n + self.max_draft]
                return list(follow)
        return []
