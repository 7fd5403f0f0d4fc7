"""Where the milliseconds of one engine step go: the whole step against isolated pieces of it.

    PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py [--model M] [--batch 1 16] [--context 128]
        [--prefill 512] [--iters 20]

For each decode batch B (B sequences with ``--context`` tokens of context, one
new token each) and for a prefill of ``--prefill`` tokens, it times (median of
``--iters`` runs after a warm-up run that compiles; every measurement goes
round all of them in turn, so load on a shared machine hits them alike):

* ``Engine.step``: the whole step as callers see it;
* host preparation (``Engine._prepare``: the numpy arrays of the batch);
* the device step (the jitted step on prepared arrays, inputs copied in,
  results fetched); ``Engine.step`` minus prepare minus this is the Python
  around it (validation, launch, collecting results);
* attention, by ablation: the device step of a second engine whose attention
  returns its queries, subtracted from the device step (the paged gathers,
  scores, softmax and weighted sum of every layer, as fused in the step);
* isolated jits of the other pieces, each over all layers with the step's
  own shapes and weights: the weight dots of the layers (q/k/v, o, gate/up,
  down), the LM head on the output rows, the KV scatter of every layer and
  greedy sampling. ``rest`` is the device step minus all of the above:
  norms, RoPE, SiLU, residual adds, the embedding gather, per-op dispatch,
  and what XLA does differently in the whole step than in the pieces.

The pieces are separate executables, so they do not add up to the step
exactly; the breakdown says where the bulk goes, not the last tenth of a ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, model_arg  # noqa: E402


def timed_round_robin(fns: dict, iters: int) -> dict[str, float]:
    """Median ms of each ``fn()`` (which must block until its work is done) over ``iters`` calls after one
    warm-up call each; the calls go round the functions, the order reversed every round, so a burst of
    load on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1000 for name, v in samples.items()}


def requests_for(engine, lengths: list[int], new: int, rng) -> tuple[list, list]:
    """Requests whose sequences hold ``lengths`` slots, the last ``new`` of them new tokens (pages allocated)."""
    from engine_jax.batch import ForwardRequest, Sample

    ps, reqs, held = engine.page_size, [], []
    for length in lengths:
        pages = engine.pool.alloc(-(-length // ps))
        held.append(pages)
        reqs.append(ForwardRequest(tokens=rng.integers(0, engine.config.vocab_size, new).tolist(),
                                   positions=range(length - new, length), pages=pages,
                                   last_page_len=(length - 1) % ps + 1, outputs=(Sample(index=new - 1),)))
    return reqs, held


def pieces(engine, batch, num_rows: int):
    """Jitted functions of the step's pieces, each over every layer, with the step's shapes."""
    import jax
    import jax.numpy as jnp

    from engine_jax.sampling import sample_tokens

    params, c = engine.params, engine.config
    T = batch.tokens.shape[0]
    x0 = jnp.ones((T, c.hidden_size), engine.dtype) * 0.01
    kv0 = jnp.ones((T, c.num_kv_heads, c.head_dim), engine.dtype)
    h_out = jnp.ones((num_rows, c.hidden_size), engine.dtype) * 0.01
    scale = c.head_dim ** -0.5

    @jax.jit
    def dots(params, x):
        for lp in params.layers:
            qkv = jnp.einsum("th,hkgd->tkgd", x, lp.w_qkv)
            x = x + qkv.reshape(T, -1)[:, :c.hidden_size] * 1e-3
            x = x + x @ lp.w_o * 1e-3
            gu = jnp.einsum("th,hci->tci", x, lp.w_gate_up)
            x = x + (gu[:, 0] * 1e-3) @ lp.w_down
        return x

    @jax.jit
    def lm_head(params, h):
        return h @ (params.lm_head if params.lm_head is not None else params.embed.T)

    @jax.jit
    def scatter(k_pages, b, k):
        # One layer's pages written num_layers times (into a copy: the engine's pool is not donated here).
        for _ in range(c.num_layers):
            k_pages = k_pages.at[b.write_pages, b.write_offsets].set(k, mode="drop")
            k = k + 1.0
        return k_pages

    @jax.jit
    def sampling(logits):
        zeros = jnp.zeros(logits.shape[0], jnp.float32)
        return sample_tokens(logits, zeros, zeros.astype(jnp.int32), zeros + 1, zeros, None, None,
                             stochastic=False, sort_width=0)

    logits = jnp.ones((num_rows, c.vocab_size), jnp.float32)
    return {
        "weight dots (all layers)": lambda: dots(params, x0).block_until_ready(),
        "LM head": lambda: lm_head(params, h_out).block_until_ready(),
        "KV scatter (K+V, all layers)": lambda: scatter(engine.cache.k[0], batch, kv0).block_until_ready(),
        "greedy sampling": lambda: sampling(logits).block_until_ready(),
    }


def no_attention(q, *args, **kwargs):
    """An attention that attends to nothing (the ablation that times attention inside the step)."""
    return q


def profile(engine, ablated, lengths: list[int], new: int, iters: int, title: str) -> None:
    import jax

    from engine_jax.engine import _fields
    from engine_jax.model import TokenBatch

    rng = np.random.default_rng(0)
    requests, held = requests_for(engine, lengths, new, rng)
    try:
        batch, outputs, static, _ = engine._prepare(requests)
        arrays = {"batch": _fields(batch), "outputs": _fields(outputs)}
        fns = {
            "step": lambda: engine.step(requests),
            "prepare": lambda: engine._prepare(requests),
            "device": lambda: jax.device_get(engine.apply_device_op("step", static, arrays)),
            "without attention": lambda: jax.device_get(ablated.apply_device_op("step", static, arrays)),
        }
        fns.update(pieces(engine, jax.device_put(TokenBatch(**_fields(batch))), len(requests)))
        ms = timed_round_robin(fns, iters)
    finally:
        for pages in held:
            engine.pool.free(pages)
    whole, prepare, device = ms.pop("step"), ms.pop("prepare"), ms.pop("device")
    parts = {"attention (all layers; ablated)": device - ms.pop("without attention"), **ms}
    parts["KV scatter (K+V, all layers)"] *= 2
    print(f"\n{title}: Engine.step {whole:.2f} ms (median of {iters})")
    print(f"  {'host: prepare arrays':32} {prepare:8.2f} ms")
    print(f"  {'host: Python around the step':32} {whole - prepare - device:8.2f} ms")
    print(f"  {'device step (in + jit + fetch)':32} {device:8.2f} ms")
    for name, ms in parts.items():
        print(f"    {name:30} {ms:8.2f} ms  {100 * ms / device:5.1f}%")
    rest = device - sum(parts.values())
    print(f"    {'rest (norms, RoPE, SiLU, ...)':30} {rest:8.2f} ms  {100 * rest / device:5.1f}%", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arg(parser)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512, help="0: skip the prefill profile")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}")
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model

    model = load_model(args.model)
    page_size = 16
    pages = max(max(args.batch) * (-(-(args.context + 1) // page_size)), -(-args.prefill // page_size)) + 8
    engine = Engine(model, page_size=page_size, num_pages=pages)
    # The same step with attention taken out: the difference is what attention costs inside the step.
    ablated = Engine(model, page_size=page_size, num_pages=pages, attention=no_attention)
    print(f"model {engine.name}, {engine.platform}, dtype {engine.dtype}")
    for b in args.batch:
        profile(engine, ablated, [args.context + 1] * b, 1, args.iters, f"decode batch {b}, context {args.context}")
    if args.prefill:
        profile(engine, ablated, [args.prefill], args.prefill, max(3, args.iters // 4), f"prefill {args.prefill}")


if __name__ == "__main__":
    main()
