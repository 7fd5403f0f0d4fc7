"""Binary run-length encoding (BRLE), the contract's compact boolean mask.

A BRLE is a list of run lengths that alternate false, true, false, ... and
always starts with a run of false (possibly 0). `[0, 3, 2]` is
true true true false false. Used for attention masks (one BRLE per new token
over the sequence's slots) and for allowed-token sets over the vocabulary.
Pure Python: no binding imports.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def encode(mask: Iterable[bool]) -> list[int]:
    """BRLE of a boolean sequence."""
    runs: list[int] = []
    current = False
    count = 0
    for bit in mask:
        bit = bool(bit)
        if bit == current:
            count += 1
        else:
            runs.append(count)
            current = bit
            count = 1
    runs.append(count)
    return runs


def decode(runs: Sequence[int]) -> list[bool]:
    """The boolean sequence a BRLE stands for."""
    out: list[bool] = []
    value = False
    for run in runs:
        if run < 0:
            raise ValueError(f"BRLE run lengths must be >= 0, got {run}")
        out.extend([value] * run)
        value = not value
    return out


def length(runs: Sequence[int]) -> int:
    """Length of the mask (sum of the runs)."""
    return sum(runs)


def from_ranges(size: int, ranges: Iterable[tuple[int, int]]) -> list[int]:
    """BRLE of a mask of `size` that is true on the half-open `ranges`."""
    mask = [False] * size
    for start, end in ranges:
        if not 0 <= start <= end <= size:
            raise ValueError(f"range [{start}, {end}) is outside a mask of length {size}")
        for i in range(start, end):
            mask[i] = True
    return encode(mask)


def from_indices(size: int, indices: Iterable[int]) -> list[int]:
    """BRLE of a mask of `size` that is true exactly at `indices` (e.g. allowed tokens)."""
    mask = [False] * size
    for i in indices:
        if not 0 <= i < size:
            raise ValueError(f"index {i} is outside a mask of length {size}")
        mask[i] = True
    return encode(mask)


def causal(context_len: int, new_tokens: int) -> list[list[int]]:
    """Per-token masks for `new_tokens` appended to `context_len` slots, causal by slot."""
    return [[0, context_len + i + 1] for i in range(new_tokens)]
