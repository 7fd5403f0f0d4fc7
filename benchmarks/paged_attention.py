"""Time the Pallas paged-attention kernel against the jnp reference.

Two batches: decode (many requests, one new token each, long KV) and prefill
(a few requests with many new tokens each, short prefixes). Both functions are
jitted; each is warmed up, then timed as the median of ``--iters`` runs.

On GPU/TPU the compiled kernel runs; on CPU only interpret mode exists, so the
CPU numbers compare the Pallas interpreter with XLA's reference and say
nothing about the kernel's speed (``--size small`` is the default there).

Output: one line per case with both times in ms and ``reference/kernel``,
then ``ratio: X`` last, X = geometric mean over the cases of
reference_ms / kernel_ms (> 1: the kernel is faster).

    PYTHONPATH=. python benchmarks/paged_attention.py [--size small|full] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from common import cpu_model
from engine_jax.paged_attention.kernel import paged_attention_kernel
from engine_jax.paged_attention.reference import paged_attention_reference


@dataclass(frozen=True)
class Case:
    name: str
    num_requests: int
    new_tokens: int  # per request
    prefix: int  # cached slots per request before this step
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16


# Llama-3.2-1B-like attention (32 q heads, 8 kv heads, head_dim 64).
FULL = [
    Case("decode", num_requests=64, new_tokens=1, prefix=1023, num_q_heads=32, num_kv_heads=8, head_dim=64),
    Case("prefill", num_requests=4, new_tokens=512, prefix=0, num_q_heads=32, num_kv_heads=8, head_dim=64),
]
SMALL = [
    Case("decode", num_requests=8, new_tokens=1, prefix=63, num_q_heads=8, num_kv_heads=2, head_dim=64),
    Case("prefill", num_requests=2, new_tokens=32, prefix=0, num_q_heads=8, num_kv_heads=2, head_dim=64),
]


def make_inputs(case: Case, dtype, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    kv_len = case.prefix + case.new_tokens
    pages_per_req = -(-kv_len // case.page_size)
    num_pages = case.num_requests * pages_per_req + 1
    num_tokens = case.num_requests * case.new_tokens
    page_table = rng.permutation(num_pages)[: case.num_requests * pages_per_req].reshape(case.num_requests, -1)
    kv_lens = np.full(case.num_requests, kv_len, np.int32)
    cu_q_lens = np.arange(case.num_requests + 1, dtype=np.int32) * case.new_tokens
    q_slots = np.tile(np.arange(case.prefix, kv_len, dtype=np.int32), case.num_requests)
    q = rng.standard_normal((num_tokens, case.num_q_heads, case.head_dim))
    kv_shape = (num_pages, case.page_size, case.num_kv_heads, case.head_dim)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(rng.standard_normal(kv_shape), dtype),
        jnp.asarray(rng.standard_normal(kv_shape), dtype),
        jnp.ones((num_pages, case.page_size), jnp.bool_),
        jnp.asarray(page_table, jnp.int32),
        jnp.asarray(kv_lens),
        jnp.asarray(cu_q_lens),
        jnp.asarray(q_slots),
        None,
    )


def time_ms(fn, args: tuple, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "full"], default="small" if on_cpu else "full")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=5 if on_cpu else 50)
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(f"CPU: {cpu_model()}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), kernel interpret={on_cpu}, {opts.dtype}")

    ratios = []
    for case in SMALL if opts.size == "small" else FULL:
        args = make_inputs(case, dtype)
        scale = case.head_dim**-0.5
        kernel = jax.jit(functools.partial(paged_attention_kernel, scale=scale, interpret=on_cpu))
        reference = jax.jit(functools.partial(paged_attention_reference, scale=scale))
        kernel_ms = time_ms(kernel, args, opts.iters)
        reference_ms = time_ms(reference, args, opts.iters)
        ratios.append(reference_ms / kernel_ms)
        print(
            f"{case.name}: {case.num_requests} requests x {case.new_tokens} new tokens, kv_len "
            f"{case.prefix + case.new_tokens}: kernel {kernel_ms:.3f} ms, reference {reference_ms:.3f} ms, "
            f"reference/kernel {ratios[-1]:.2f}"
        )
    print(f"ratio: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
