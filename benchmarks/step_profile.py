"""Where the milliseconds of one engine step go: the whole step against isolated pieces of it.

    PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py [--model M] [--batch 1 16] [--context 128]
        [--prefill 512] [--iters 20]

For each decode batch B (B sequences with ``--context`` tokens of context, one
new token each) and for a prefill of ``--prefill`` tokens, it times (median of
``--iters`` runs, after a warm-up run that compiles):

* ``Engine.step``: the whole step as callers see it;
* host preparation (``Engine._prepare``: the numpy arrays of the batch);
* the device step (the jitted step on prepared arrays, inputs copied in,
  results fetched); ``Engine.step`` minus prepare minus this is the Python
  around it (validation, launch, collecting results);
* isolated jits of the pieces, each run over all layers with the step's own
  shapes and weights: the weight dots of the layers (q/k/v, o, gate/up, down),
  the LM head on the output rows, the paged attention of every layer (the
  step's page table and lengths), the KV scatter of every layer and greedy
  sampling. ``rest`` is the device step minus these: norms, RoPE, SiLU,
  residual adds, the embedding gather, and what XLA fuses differently in
  the whole step than in the pieces.

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
from common import cpu_model, load_engine, model_arg  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median ms of ``fn()`` (which must block until its work is done) over ``iters`` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


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
    q0 = jnp.ones((T, c.num_heads, c.head_dim), engine.dtype) * 0.01
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
    def attention(cache, b, q):
        out = q
        for layer in range(c.num_layers):
            out = out + 1e-3 * engine.attention_fn(out, cache.k[layer], cache.v[layer], cache.slot_valid,
                                                   b.page_table, b.kv_lens, b.cu_q_lens, b.q_slots, b.custom_mask,
                                                   scale=scale)
        return out

    @jax.jit
    def scatter(k_pages, b, k):
        # One layer's pages written num_layers times (a fresh copy: the real step's pool is donated).
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
    k_pages = engine.cache.k[0]
    return {
        "weight dots (all layers)": lambda: dots(params, x0).block_until_ready(),
        "LM head": lambda: lm_head(params, h_out).block_until_ready(),
        "attention (all layers)": lambda: attention(engine.cache, batch, q0).block_until_ready(),
        "KV scatter (K+V, all layers)": lambda: scatter(k_pages, batch, kv0).block_until_ready(),
        "greedy sampling": lambda: sampling(logits).block_until_ready(),
    }


def profile(engine, lengths: list[int], new: int, iters: int, title: str) -> None:
    import jax

    from engine_jax.engine import _fields
    from engine_jax.model import TokenBatch

    rng = np.random.default_rng(0)
    requests, held = requests_for(engine, lengths, new, rng)
    try:
        whole = timed(lambda: engine.step(requests), iters)
        prepare = timed(lambda: engine._prepare(requests), iters)
        batch, outputs, static, _ = engine._prepare(requests)
        arrays = {"batch": _fields(batch), "outputs": _fields(outputs)}
        device = timed(lambda: jax.device_get(engine.apply_device_op("step", static, arrays)), iters)
        device_batch = jax.device_put(TokenBatch(**_fields(batch)))
        parts = {name: timed(fn, iters) for name, fn in pieces(engine, device_batch, len(requests)).items()}
        parts["KV scatter (K+V, all layers)"] *= 2
    finally:
        for pages in held:
            engine.pool.free(pages)
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
    engine = load_engine(args.model)
    print(f"model {engine.name}, {engine.platform}, dtype {engine.dtype}")
    for b in args.batch:
        profile(engine, [args.context + 1] * b, 1, args.iters, f"decode batch {b}, context {args.context}")
    if args.prefill:
        profile(engine, [args.prefill], args.prefill, max(3, args.iters // 4), f"prefill {args.prefill}")


if __name__ == "__main__":
    main()
