"""The plain native generation loop: the baseline the inferlet path is measured against.

Prefill every prompt in one step, then decode all live sequences together,
one token each per step, allocating pages from the engine's pool as
sequences cross page boundaries and freeing them all at the end.
"""

from __future__ import annotations

from typing import Sequence

from engine_jax.batch import EngineInputError, ForwardRequest, Sample
from engine_jax.engine import Engine

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, sequence, step) over 64 bits
_U64 = (1 << 64) - 1


def _row_seed(seed: int, sequence: int, step: int) -> int:
    return (((seed * 1_000_003 + sequence) * 1_000_033 + step) * _SEED_MIX) & _U64


def generate(
    engine: Engine,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
) -> list[list[int]]:
    """New tokens per prompt (a stop token, when drawn, is included and ends that sequence)."""
    _check(engine, prompts, max_new_tokens)
    engine.validate_output(Sample(index=0, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed), 0, 1)
    if max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    ps = engine.page_size
    stops = frozenset(int(t) for t in stop_token_ids)
    pages: list[list[int]] = [[] for _ in prompts]
    lengths = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]

    def sample(i: int, index: int, step: int) -> Sample:
        row_seed = None if seed is None else _row_seed(seed, i, step)
        return Sample(index=index, temperature=temperature, top_k=top_k, top_p=top_p, seed=row_seed)

    def extend(i: int, new_tokens: int) -> int:
        """Grows sequence i by new_tokens slots (allocating pages); returns its last_page_len."""
        lengths[i] += new_tokens
        needed = -(-lengths[i] // ps) - len(pages[i])
        if needed > 0:
            pages[i].extend(engine.pool.alloc(needed))
        return (lengths[i] - 1) % ps + 1

    try:
        requests = []
        for i, prompt in enumerate(prompts):
            last = extend(i, len(prompt))
            requests.append(ForwardRequest(
                tokens=prompt, positions=range(len(prompt)), pages=pages[i], last_page_len=last,
                outputs=(sample(i, len(prompt) - 1, 0),),
            ))
        results = engine._run(requests)
        live = []
        for i, result in enumerate(results):
            token = result[0]
            outputs[i].append(token)
            if token not in stops and max_new_tokens > 1:
                live.append(i)
        step = 1
        while live:
            requests = []
            for i in live:
                position = lengths[i]
                last = extend(i, 1)
                requests.append(ForwardRequest(
                    tokens=(outputs[i][-1],), positions=(position,), pages=pages[i], last_page_len=last,
                    outputs=(sample(i, 0, step),),
                ))
            results = engine._run(requests)
            still = []
            for i, result in zip(live, results):
                token = result[0]
                outputs[i].append(token)
                if token not in stops and len(outputs[i]) < max_new_tokens:
                    still.append(i)
            live = still
            step += 1
    finally:
        for owned in pages:
            if owned:
                engine.pool.free(owned)
    return outputs


def _check(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> None:
    c = engine.config
    if max_new_tokens < 0:
        raise EngineInputError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise EngineInputError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < c.vocab_size]
        if bad:
            raise EngineInputError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{c.vocab_size - 1})")
        # The last generated token is never fed back, hence the -1.
        if len(prompt) + max_new_tokens - 1 > c.max_position_embeddings:
            raise EngineInputError(
                f"prompt {i}: {len(prompt)} tokens + {max_new_tokens} new exceed "
                f"max_position_embeddings={c.max_position_embeddings}"
            )
