"""Decode step time with tensor parallelism over 1, 2 and 4 devices, as ratios to one device.

On a CPU the devices are forced (``--xla_force_host_platform_device_count``)
and share the same cores, so no speed-up is possible: the ratio measures what
the sharded step costs on top of the same arithmetic (the all-reduces after
attention and MLP, the masked embedding lookup, the logits all-gather, the
per-shard attention). On GPUs/TPUs the same script times real devices.

By default the model is SmolLM2-135M's shape (30 layers, hidden 576,
MLP 1536, vocabulary 49152) with 8 query and 4 KV heads of 72 and random
weights, so that 2 and 4 divide its heads (SmolLM2 itself, 9 query heads,
only splits by 3: ``--model smollm2-135m-instruct`` times TP=1 and 3).

Every degree's engine holds the same sequences; the arms are interleaved
(A B C, C B A, ...) and summarised by per-round medians. Prints ``ratio: X``
last: the step time at the largest degree over the TP=1 one.
"""

from __future__ import annotations

import argparse
import os
import sys

DEGREES = (1, 2, 4)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts (it reads the flag once); ignored by accelerator backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(DEGREES)}").strip()

from common import REPO, cpu_model, fmt_samples, interleave, median  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="a model name or path, timed at the degrees up to 4 it allows (default: the "
                             "random SmolLM2-sized model with 8 query heads, at 1, 2, 4)")
    parser.add_argument("--batch", type=int, default=1, help="decode requests per step (default 1)")
    parser.add_argument("--context", type=int, default=128, help="tokens in each sequence's KV before the timed steps")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per arm per round")
    args = parser.parse_args()

    import jax
    import numpy as np

    from engine_jax.batch import ForwardRequest, Sample
    from engine_jax.engine import Engine
    from engine_jax.sharding import make_mesh, valid_degrees

    devices = jax.devices()
    load, config = _model(args.model)
    degrees = [n for n in valid_degrees(config, limit=min(max(DEGREES), len(devices)))]
    print(f"host CPU: {cpu_model()}; {len(devices)} {devices[0].platform} device(s) "
          f"({devices[0].device_kind}); model {args.model or 'random SmolLM2-sized, 8 query / 4 KV heads'} "
          f"({config.num_layers} layers, hidden {config.hidden_size}), batch {args.batch}, context {args.context}; "
          f"degrees {degrees}")
    ps = 16
    per_sequence = -(-(args.context + 1 + 3 * args.rounds * args.steps + 8) // ps)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.context).tolist()

    arms = {}
    for n in degrees:
        mesh = make_mesh(n) if n > 1 else None
        engine = Engine(load(mesh), page_size=ps, num_pages=args.batch * per_sequence, mesh=mesh)
        arms[f"TP={n}"] = _decoder(engine, args.batch, per_sequence, prompt, ForwardRequest, Sample)
    for arm in arms.values():  # compile and warm every arm
        for _ in range(3):
            arm()

    rounds = {name: [] for name in arms}
    for _ in range(args.rounds):
        samples = interleave({name: (lambda a=arm: median([a() for _ in range(args.steps)])) for name, arm in arms.items()},
                             repeats=1)
        for name, values in samples.items():
            rounds[name].extend(values)
    base = rounds["TP=1"]
    for name, values in rounds.items():
        per_round = [v / b for v, b in zip(values, base)]
        print(f"{name}: decode step {fmt_samples(values, 1e3, ' ms')}; / TP=1 per round: median "
              f"{median(per_round):.3f} ({', '.join(f'{r:.2f}' for r in per_round)})")
    last = f"TP={degrees[-1]}"
    print(f"ratio: {median([v / b for v, b in zip(rounds[last], base)]):.3f}")


def _model(name):
    """(mesh -> loaded model, ModelConfig) of ``name``, or of the random SmolLM2-sized model."""
    import types

    import jax.numpy as jnp
    import numpy as np

    from engine_jax.config import ModelConfig
    from engine_jax.families import config_from_hf, params_from_state_dict
    from engine_jax.loader import load_model
    from engine_jax.model import hf_tensor_shapes
    from engine_jax.sharding import TensorParallel

    if name is not None:
        from engine_jax import checkpoint, registry

        directory = registry.pull(name) if name in registry.KNOWN_MODELS else name
        config = config_from_hf(checkpoint.read_config(directory))
        return (lambda mesh: load_model(name, mesh=mesh)), config
    config = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=8, num_kv_heads=4, head_dim=72, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(shape, dtype=np.float32) * 0.02 for k, shape in hf_tensor_shapes(config).items()}

    def load(mesh):
        params = params_from_state_dict(config, state, jnp.float32,
                                        TensorParallel(mesh, config) if mesh is not None else None)
        return types.SimpleNamespace(name="random", config=config, params=params, tokenizer=None)

    return load, config


def _decoder(engine, batch, per_sequence, prompt, ForwardRequest, Sample):
    """A function running one decode step of ``batch`` sequences on ``engine`` and returning its seconds."""
    import time

    ps = engine.page_size
    sequences = [engine.pool.alloc(per_sequence) for _ in range(batch)]
    n = len(prompt)
    engine.step([ForwardRequest(tokens=prompt, positions=range(n), pages=pages[:-(-n // ps)],
                                last_page_len=(n - 1) % ps + 1, outputs=(Sample(index=0),)) for pages in sequences])
    state = {"length": n, "tokens": [0] * batch}

    def step() -> float:
        state["length"] += 1
        length = state["length"]
        requests = [ForwardRequest(tokens=(token,), positions=(length - 1,), pages=pages[:-(-length // ps)],
                                   last_page_len=(length - 1) % ps + 1, outputs=(Sample(index=0),))
                    for token, pages in zip(state["tokens"], sequences)]
        start = time.perf_counter()
        results = engine.step(requests)
        elapsed = time.perf_counter() - start
        state["tokens"] = [r[0] for r in results]
        return elapsed

    return step


if __name__ == "__main__":
    main()
