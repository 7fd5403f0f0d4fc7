"""Roofline: the engine's batch-1 decode step vs reading the model's weights once at this machine's memory bandwidth.

A decode step at batch 1 must stream every weight (and the sequence's KV)
from memory once, so `weight_bytes / bandwidth` is the least a step can take.
The bandwidth is measured here, in the same run: a jitted `jnp.sum` and a
numpy sum over a buffer much larger than the caches (best of the two). The
decode step is `Engine.step` with one one-token request at a fixed context,
greedy sample, timed like `engine_decode.py`. The two measurements are
interleaved in rounds; figures are medians over rounds.

    PYTHONPATH=. .venv/bin/python benchmarks/roofline.py [--model M] [--context 128]

Last line: `ratio: X`, X = roofline time / measured step time (1.0 = at the
memory roofline; target >= 0.70), the median over rounds of each round's
ratio (its bandwidth and its steps measured back to back).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import cpu_model, fmt_samples, load_engine, median, model_arg


def weight_bytes(params) -> int:
    """Bytes of weights a decode step must read: all of them, except that when the
    output head is a separate matrix the embedding table is only gathered (one row
    per token). The engine keeps a transposed copy of a tied embedding as the head
    on CPU, so this is the model's own weight size either way."""
    total = sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(params))
    if params.lm_head is not None:
        total -= int(params.embed.nbytes) - int(params.embed.nbytes // params.embed.shape[0])
    return total


class Bandwidth:
    """Streams a large buffer: one read of every byte per call."""

    def __init__(self, size_bytes: int) -> None:
        n = size_bytes // 4
        self.host = np.ones(n, np.float32)
        self.device = jnp.ones(n, jnp.float32)
        self._sum = jax.jit(jnp.sum)
        self.nbytes = n * 4
        jax.block_until_ready(self._sum(self.device))

    def jax_seconds(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self._sum(self.device))
        return time.perf_counter() - start

    def numpy_seconds(self) -> float:
        start = time.perf_counter()
        self.host.sum()
        return time.perf_counter() - start


def gemv_chain(params):
    """A jitted function doing only the step's weight matmuls at batch 1 (same weights, same
    order, no attention, norms, KV writes or sampling): how fast XLA streams the weights."""
    def chain(params, x):
        for lp in params.layers:
            qkv = x @ lp.w_qkv.reshape(lp.w_qkv.shape[0], -1)
            x = x + qkv[:, : lp.w_o.shape[0]] @ lp.w_o
            gate_up = x @ lp.w_gate_up.reshape(lp.w_gate_up.shape[0], -1)
            x = x + gate_up[:, : lp.w_down.shape[0]] @ lp.w_down
        head = params.lm_head if params.lm_head is not None else params.embed.T
        return jnp.argmax(x @ head, axis=-1)

    fn = jax.jit(chain)
    x = jnp.ones((1, params.layers[0].w_qkv.shape[0]), params.embed.dtype)

    def seconds() -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        return time.perf_counter() - start

    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--context", type=int, default=128, help="tokens in KV before the timed steps")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--buffer-mb", type=int, default=1024, help="bandwidth buffer size")
    args = parser.parse_args()

    from engine_jax.batch import ForwardRequest, Sample

    engine = load_engine(args.model)
    c = engine.config
    wbytes = weight_bytes(engine.params)
    kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * engine.dtype.itemsize * (args.context + 1)
    params = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(engine.model.params))
    print(f"model {engine.name}: {params / 1e6:.1f} M parameters; a decode step reads {wbytes / 1e6:.1f} MB "
          f"of weights ({engine.dtype}), "
          f"KV read per step at context {args.context}: {kv_bytes / 1e6:.2f} MB; "
          f"{len(jax.devices())} {jax.default_backend()} device(s); CPU: {cpu_model()}")

    ps = engine.page_size
    total = args.context + 1 + args.rounds * args.steps + 16
    pages = engine.pool.alloc(-(-total // ps))
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, args.context).tolist()
    engine.step([ForwardRequest(tokens=prompt, positions=range(args.context), pages=pages[: -(-args.context // ps)],
                                last_page_len=(args.context - 1) % ps + 1, outputs=(Sample(index=0),))])
    length = args.context
    token = 0

    def step_seconds() -> float:
        # Decoding moves the sequence along, but `steps * rounds` tokens stay in one page bucket.
        nonlocal length, token
        length += 1
        req = ForwardRequest(tokens=(token,), positions=(length - 1,), pages=pages[: -(-length // ps)],
                             last_page_len=(length - 1) % ps + 1, outputs=(Sample(index=0),))
        start = time.perf_counter()
        (out,) = engine.step([req])
        elapsed = time.perf_counter() - start
        token = out[0]
        return elapsed

    bw = Bandwidth(args.buffer_mb << 20)
    gemv_seconds = gemv_chain(engine.params)
    for _ in range(3):  # compile + warm all
        gemv_seconds()
        step_seconds()
        bw.jax_seconds()
        bw.numpy_seconds()

    steps, gemvs, jax_bw, np_bw = [], [], [], []
    for _ in range(args.rounds):
        steps.append(median([step_seconds() for _ in range(args.steps)]))
        gemvs.append(median([gemv_seconds() for _ in range(args.steps)]))
        jax_bw.append(bw.nbytes / median([bw.jax_seconds() for _ in range(3)]))
        np_bw.append(bw.nbytes / median([bw.numpy_seconds() for _ in range(3)]))
    engine.pool.free(pages)

    bandwidth = max(median(jax_bw), median(np_bw))
    step = median(steps)
    roofline = (wbytes + kv_bytes) / bandwidth
    print(f"memory bandwidth ({args.buffer_mb} MiB buffer): jax sum {median(jax_bw) / 1e9:.2f} GB/s, "
          f"numpy sum {median(np_bw) / 1e9:.2f} GB/s -> using {bandwidth / 1e9:.2f} GB/s")
    print(f"decode step at batch 1: {fmt_samples(steps, 1e3, ' ms')} (per-round medians of {args.steps} steps)")
    print(f"weight matmuls alone (jitted GEMV chain, batch 1): {fmt_samples(gemvs, 1e3, ' ms')}; "
          f"the rest of the step (attention, norms, RoPE, KV writes, sampling, host work): "
          f"{(step - median(gemvs)) * 1e3:.2f} ms")
    print(f"roofline time (weights + KV once at {bandwidth / 1e9:.2f} GB/s): {roofline * 1e3:.2f} ms")
    print(f"effective bandwidth of the step: {(wbytes + kv_bytes) / step / 1e9:.2f} GB/s")
    # Each round's bandwidth and step were measured within the same few
    # seconds, so their ratio does not swing with the shared host's memory
    # system the way two medians taken over the whole run can.
    per_round = [(wbytes + kv_bytes) / max(j, n) / s for j, n, s in zip(jax_bw, np_bw, steps)]
    print(f"ratio of the medians: {roofline / step:.3f}; per-round ratios "
          + ", ".join(f"{r:.3f}" for r in per_round))
    print(f"ratio: {median(per_round):.3f}")


if __name__ == "__main__":
    main()
