"""Keeps a long-running process under the kernel's limit on memory mappings.

XLA:CPU links every kernel of an executable into its own few memory
mappings (code, data, read-only data): one SmolLM2-135M step executable adds
~470 of them, and JAX keeps every executable it has compiled for the life of
the process. Linux caps a process at ``vm.max_map_count`` mappings (65530 by
default), and when the JIT linker's next ``mmap`` fails the process dies
with a segmentation fault. A server that meets ~130 different batch shapes
(tokens x requests x pages x outputs x sampler kinds) would get there.

``MapBudget.check`` is called after a step compiled a new executable. Past
``fraction`` of the limit it clears JAX's in-memory caches, which unmaps every
executable nobody holds; the shapes still in use come back from the
persistent compilation cache (well under a second each) when next run.
Where ``/proc`` is missing (not Linux) the check does nothing.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import jax

_log = logging.getLogger(__name__)

_SELF_MAPS = Path("/proc/self/maps")
_MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")


def map_count() -> int | None:
    """The number of memory mappings of this process, or None where ``/proc`` does not tell."""
    try:
        with _SELF_MAPS.open("rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def map_limit() -> int | None:
    """The kernel's per-process mapping limit (``vm.max_map_count``), or None where unknown."""
    try:
        return int(_MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return None


class MapBudget:
    """Clears JAX's caches when the process holds more than ``fraction`` of its mapping limit."""

    def __init__(self, limit: int | None = None, fraction: float = 0.5) -> None:
        self.limit = map_limit() if limit is None else limit
        self.fraction = fraction
        self.clears = 0

    def check(self) -> bool:
        """Clears the caches if over budget; True if it did."""
        if self.limit is None:
            return False
        count = map_count()
        if count is None or count <= self.fraction * self.limit:
            return False
        jax.clear_caches()
        gc.collect()  # executables only referenced from collected cycles unmap now
        self.clears += 1
        _log.warning(
            "%d of the %d memory mappings a process may hold are in use (mostly compiled XLA "
            "executables); cleared JAX's executable caches (%d mappings left), shapes in use "
            "recompile from the persistent cache", count, self.limit, map_count() or 0)
        return True
