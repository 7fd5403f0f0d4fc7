"""Decode step time of the engine at batch 1 and 16 (ms/step), and of the native generate loop.

    python benchmarks/engine_decode.py MODEL [--batch 1 16] [--context 128] [--steps 32]

MODEL is anything ``engine_jax.loader.load_model`` accepts (a registry name,
a GGUF file, a Hugging Face checkpoint directory). Each sequence is
prefilled with ``--context`` tokens first; the timed steps then decode one
token per sequence with greedy sampling, as ``generate`` does. ``generate()``
itself is timed too, with its prefill subtracted out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from engine_jax.batch import ForwardRequest, Sample
from engine_jax.engine import Engine
from engine_jax.generate import generate


def decode_ms_per_step(engine: Engine, batch: int, context: int, steps: int, warmup: int = 3) -> list[float]:
    ps = engine.page_size
    vocab = engine.config.vocab_size
    rng = np.random.default_rng(0)
    total = context + warmup + steps
    seqs = [engine.pool.alloc(-(-total // ps)) for _ in range(batch)]
    try:
        prompts = [rng.integers(0, vocab, context).tolist() for _ in range(batch)]
        engine.step([
            ForwardRequest(tokens=p, positions=range(context), pages=pages[: -(-context // ps)],
                           last_page_len=(context - 1) % ps + 1, outputs=(Sample(index=context - 1),))
            for p, pages in zip(prompts, seqs)
        ])
        times = []
        tokens = [0] * batch
        for i in range(warmup + steps):
            length = context + i + 1
            requests = [
                ForwardRequest(tokens=(tokens[b],), positions=(length - 1,), pages=seqs[b][: -(-length // ps)],
                               last_page_len=(length - 1) % ps + 1, outputs=(Sample(index=0),))
                for b in range(batch)
            ]
            start = time.perf_counter()
            results = engine.step(requests)
            elapsed = time.perf_counter() - start
            tokens = [r[0] for r in results]
            if i >= warmup:
                times.append(elapsed * 1000)
        return times
    finally:
        for pages in seqs:
            engine.pool.free(pages)


def generate_ms_per_step(engine: Engine, batch: int, context: int, steps: int) -> float:
    """Decode ms/step of ``generate``: (time for 1 + steps tokens - time for 1 token) / steps, prefill cancelled out."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, engine.config.vocab_size, context).tolist() for _ in range(batch)]
    generate(engine, prompts, steps + 1)  # compiles every shape the timed runs meet

    def timed(n: int) -> float:
        start = time.perf_counter()
        generate(engine, prompts, n)
        return time.perf_counter() - start

    return (timed(steps + 1) - timed(1)) * 1000 / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model name, GGUF file or Hugging Face checkpoint directory")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--attention", default=None, help="reference | kernel | interpret (default: platform)")
    args = parser.parse_args(argv)

    from engine_jax.loader import load_model

    model = load_model(args.model)
    c = model.config
    print(f"model {model.name}: {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
          f"vocab {c.vocab_size}, dtype {model.params.embed.dtype}")
    max_len = args.context + args.steps + 8
    pages_needed = max(args.batch) * (-(-max_len // args.page_size)) + 8
    engine = Engine(model, page_size=args.page_size, num_pages=pages_needed, attention=args.attention)
    for batch in args.batch:
        times = decode_ms_per_step(engine, batch, args.context, args.steps)
        median = statistics.median(times)
        print(f"batch {batch:3d}: decode {median:7.2f} ms/step (min {min(times):.2f}), "
              f"{batch * 1000 / median:8.1f} tokens/s")
        gen = generate_ms_per_step(engine, batch, args.context, args.steps)
        print(f"batch {batch:3d}: generate() {gen:7.2f} ms/step")


if __name__ == "__main__":
    main()
