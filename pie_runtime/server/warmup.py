"""Compiling the common step shapes before the first client comes.

The engine compiles one executable per bucketed batch shape (see
`engine_jax.engine`), seconds each on a CPU; the first request to meet a
new shape waits for it. The server runs one throwaway step per common shape
first — prefills of the given prompt lengths, and decode batches of the given
sizes over contexts of 1, 2, 4 and 8 pages, greedy and sampled — under a
progress bar. JAX's persistent compilation cache makes later starts cheap.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

from engine_jax.batch import ForwardRequest, Sample

DECODE_CONTEXT_PAGES = (1, 2, 4, 8)


def warmup_shapes(engine: Any, batch_sizes: Sequence[int], prompt_lengths: Sequence[int]) -> list[tuple]:
    """(kind, requests, new tokens, pages and sequence length per request, temperature) per step to run."""
    ps, pool_pages = engine.page_size, engine.num_pages
    max_len = engine.config.max_position_embeddings
    shapes: list[tuple] = []
    for n in prompt_lengths:
        pages = -(-n // ps)
        if pages <= pool_pages and n <= max_len:
            shapes.append(("prefill", 1, n, pages, n, 0.0))
    for b in batch_sizes:
        for pages in DECODE_CONTEXT_PAGES:
            if b * pages <= pool_pages and pages * ps <= max_len:
                for temperature in (0.0, 1.0):
                    shapes.append(("decode", b, 1, pages, pages * ps, temperature))
    return shapes


def warm_up(engine: Any, batch_sizes: Sequence[int], prompt_lengths: Sequence[int],
            log: Callable[[str], None]) -> int:
    """Runs one step of each shape (the engine must be idle: before the serving core starts).
    Returns how many steps ran."""
    from tqdm import tqdm

    # Data-parallel replicas (engine_jax.replicas) each compile their own steps (their own devices).
    replicas = getattr(engine, "replicas", [engine])
    shapes = [(replica, *shape) for replica in replicas
              for shape in warmup_shapes(replica, batch_sizes, prompt_lengths)]
    if not shapes:
        return 0
    started = time.perf_counter()
    bar = tqdm(shapes, desc="pie-serve: compiling step shapes", unit="shape", file=sys.stderr)
    for target, kind, requests, tokens, pages, length, temperature in bar:
        bar.set_postfix_str(f"{kind} {requests}x{pages} pages")
        ids = target.pool.alloc(requests * pages)
        try:
            target.step([_request(ids[r * pages:(r + 1) * pages], tokens, length, target.page_size, temperature)
                         for r in range(requests)])
        finally:
            target.pool.free(ids)
    bar.close()
    log(f"pie-serve: compiled {len(shapes)} step shapes in {time.perf_counter() - started:.1f}s")
    return len(shapes)


def _request(pages: list[int], tokens: int, length: int, page_size: int, temperature: float) -> ForwardRequest:
    """`tokens` new tokens ending a sequence of `length` slots on `pages`."""
    return ForwardRequest(
        tokens=[0] * tokens,
        positions=list(range(length - tokens, length)),
        pages=pages,
        last_page_len=length - (len(pages) - 1) * page_size,
        outputs=(Sample(index=tokens - 1, temperature=temperature),),
    )
