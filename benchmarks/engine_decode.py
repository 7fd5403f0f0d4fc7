"""Decode tokens/s of the engine's native loop vs Hugging Face transformers ``generate``, same model and weights.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_decode.py [MODEL | --model MODEL] [--batch 1 16]
        [--context 128] [--steps 32] [--repeats 5] [--weights float [int8]] [--no-hf] [--no-steps]

MODEL is anything ``engine_jax.loader.load_model`` accepts (a registry name
such as ``gemma3-270m``, a GGUF file, a Hugging Face checkpoint directory of
any supported family; default: the default model). Its weights are read once into host memory; the engine and a
transformers ``AutoModelForCausalLM`` (float32, eval, torch threads = CPU
cores) are both built from that state dict, so both arms run the same
weights (for a GGUF file: the same dequantised values).

Per batch size B, every arm gets the same B random prompts of ``--context``
tokens and decodes greedily:

* ours: ``engine_jax.generate.generate(engine, prompts, n)``
* transformers: ``model.generate(ids, do_sample=False, min_new_tokens=n, max_new_tokens=n)``

The decode time per step is (time for ``steps + 1`` new tokens - time for 1
new token) / ``steps``: both runs prefill the same prompts, so the prefill
cancels out. Each arm is warmed up once (compiling every shape the engine
meets), then the pairs are timed ``--repeats`` times, the arms interleaved
(ours, hf, hf, ours, ...), and summarised by medians. Decode tokens/s =
B * 1000 / (ms per step); ratio = ours / transformers tokens/s. The last
line is ``ratio: X``, X = the smaller ratio over the batch sizes.

``--weights float int8`` builds one engine per weight format from the same
state dict (``--weights int8``: ``engine_jax.quant``) and times them as arms
of the same run ("ours" and "ours-int8"); each extra arm's greedy tokens are
compared with the first's, and its decode time printed as a ratio to it.

Also printed (skip with ``--no-steps``): the engine's bare ``Engine.step``
decode time (median over ``--steps`` steps after 3 warm-up steps), i.e.
without the native loop's per-step host work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine_jax.batch import ForwardRequest, Sample  # noqa: E402
from engine_jax.engine import Engine  # noqa: E402
from engine_jax.generate import generate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402


def decode_ms_per_step(engine: Engine, batch: int, context: int, steps: int, warmup: int = 3) -> list[float]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.config.vocab_size, context).tolist() for _ in range(batch)]
    return decode_steps(engine, prompts, steps, warmup)[0]


def decode_steps(engine: Engine, prompts: list[list[int]], steps: int,
                 warmup: int = 3) -> tuple[list[float], list[list[int]]]:
    """Prefills ``prompts`` (one step, untimed), then ``warmup + steps`` greedy ``Engine.step``
    decode steps of all of them at once: (ms of each step after the warm-up ones, each prompt's
    greedy tokens, the prefill's first)."""
    ps = engine.page_size
    total = max(map(len, prompts)) + warmup + steps
    seqs = [engine.pool.alloc(-(-total // ps)) for _ in prompts]
    try:
        first = engine.step([
            ForwardRequest(tokens=p, positions=range(len(p)), pages=pages[: -(-len(p) // ps)],
                           last_page_len=(len(p) - 1) % ps + 1, outputs=(Sample(index=len(p) - 1),))
            for p, pages in zip(prompts, seqs)
        ])
        generated = [[r[0]] for r in first]
        times = []
        for i in range(warmup + steps):
            requests = []
            for p, pages, out in zip(prompts, seqs, generated):
                length = len(p) + i + 1
                requests.append(ForwardRequest(tokens=(out[-1],), positions=(length - 1,),
                                               pages=pages[: -(-length // ps)], last_page_len=(length - 1) % ps + 1,
                                               outputs=(Sample(index=0),)))
            start = time.perf_counter()
            results = engine.step(requests)
            elapsed = time.perf_counter() - start
            for out, r in zip(generated, results):
                out.append(r[0])
            if i >= warmup:
                times.append(elapsed * 1000)
        return times, generated
    finally:
        for pages in seqs:
            engine.pool.free(pages)


# ------------------------------------------------------------------------------------------ the two arms


class OursArm:
    def __init__(self, engine: Engine, weights: str = "float") -> None:
        self.engine = engine
        self.name = "ours" if weights == "float" else f"ours-{weights}"

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return generate(self.engine, prompts, n)


class HFArm:
    name = "transformers"

    def __init__(self, hf_config: dict, state_dict: dict[str, np.ndarray]) -> None:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        config_class = transformers.CONFIG_MAPPING[hf_config["model_type"]]
        config = config_class.from_dict(dict(hf_config))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(
            {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state_dict.items()}, strict=False
        )
        allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - allowed_missing or unexpected:
            raise RuntimeError(f"state dict does not fit transformers' model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        self.model = model.eval()
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=n, max_new_tokens=n,
                pad_token_id=self.pad_id, num_beams=1,
            )
        return out[:, ids.shape[1]:].tolist()


def timed(arm, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = arm.run(prompts, n)
    return time.perf_counter() - start, tokens


def compare(arms: list, batch: int, context: int, steps: int, repeats: int, vocab: int) -> dict[str, list[float]]:
    """Decode ms/step of each arm per repeat: (t(steps + 1) - t(1)) / steps, arms interleaved."""
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, vocab, context).tolist() for _ in range(batch)]
    outputs = {}
    for arm in arms:  # warm-up: compiles every shape of the engine, warms torch's allocator
        start = time.perf_counter()
        outputs[arm.name] = arm.run(prompts, steps + 1)
        print(f"  batch {batch:3d} {arm.name:>12}: warm-up {time.perf_counter() - start:6.1f} s", flush=True)
    for arm in arms[1:]:
        a, b = np.array(outputs[arms[0].name]), np.array(outputs[arm.name])
        print(f"  batch {batch:3d}: greedy tokens identical in {arms[0].name} and {arm.name}: "
              f"{(a == b).mean() * 100:.1f}% (first tokens: {(a[:, 0] == b[:, 0]).mean() * 100:.0f}%)", flush=True)
    ms: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for i in range(repeats):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            long, _ = timed(arm, prompts, steps + 1)
            short, _ = timed(arm, prompts, 1)
            ms[arm.name].append((long - short) * 1000 / steps)
    return ms


def main(argv: list[str] | None = None) -> None:
    import jax.numpy as jnp

    from engine_jax.config import WEIGHT_FORMATS
    from engine_jax.families import config_from_hf, params_from_state_dict
    from engine_jax.loader import LoadedModel, default_dtype, read_model
    from engine_jax.quant import weight_bytes
    from engine_jax.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"model name, GGUF file or Hugging Face checkpoint directory (default {DEFAULT_MODEL})")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", help="the same, as an option")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--attention", default=None, help="reference | kernel | interpret (default: platform)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHT_FORMATS, default=["float"],
                        help="weight formats of the engine arms (int8: engine_jax.quant; default float)")
    parser.add_argument("--no-hf", action="store_true", help="time the engine only")
    parser.add_argument("--no-steps", action="store_true", help="skip the bare Engine.step decode timing")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    host = read_model(args.model_option or args.model)
    config = config_from_hf(host.hf_config)
    max_len = args.context + args.steps + 8
    pages_needed = max(args.batch) * (-(-max_len // args.page_size)) + 8
    arms = []
    for weights in args.weights:
        params = params_from_state_dict(config, host.state_dict, default_dtype(), weights=weights)
        model = LoadedModel(name=host.name, config=config, tokenizer=host.tokenizer, hf_config=host.hf_config,
                            params=params, source=host.source)
        engine = Engine(model, page_size=args.page_size, num_pages=pages_needed, attention=args.attention)
        arms.append(OursArm(engine, weights))
    c = config
    print(f"model {host.name}: {c.architecture}, {c.num_layers} layers, hidden {c.hidden_size}, "
          f"vocab {c.vocab_size}, dtype {jnp.dtype(default_dtype()).name}, weights "
          f"{', '.join(f'{w} {weight_bytes(a.engine.params) / 2**20:.0f} MiB' for w, a in zip(args.weights, arms))}; "
          f"context {args.context}, {args.steps} timed decode steps, {args.repeats} repeats; CPU: {cpu_model()}")
    if not args.no_hf:
        arms.append(HFArm(host.hf_config, host.state_dict))
    del host

    summary = []
    for batch in args.batch:
        if not args.no_steps:
            for arm in arms[:len(args.weights)]:
                times = decode_ms_per_step(arm.engine, batch, args.context, args.steps)
                median = statistics.median(times)
                print(f"batch {batch:3d}: {arm.name:>12} Engine.step decode {median:7.2f} ms/step "
                      f"(min {min(times):.2f}), {batch * 1000 / median:8.1f} tokens/s", flush=True)
        ms = compare(arms, batch, args.context, args.steps, args.repeats, c.vocab_size)
        speeds = {}
        for name, values in ms.items():
            median = statistics.median(values)
            speeds[name] = batch * 1000 / median
            print(f"batch {batch:3d}: {name:>12} generate decode {median:7.2f} ms/step "
                  f"({', '.join(f'{v:.1f}' for v in values)}), {speeds[name]:8.1f} tokens/s", flush=True)
        for arm in arms[1:len(args.weights)]:
            print(f"batch {batch:3d}: {arm.name} / {arms[0].name} decode time = "
                  f"{speeds[arms[0].name] / speeds[arm.name]:.2f}", flush=True)
        if "transformers" in speeds:
            ratio = speeds[arms[0].name] / speeds["transformers"]
            summary.append(ratio)
            print(f"batch {batch:3d}: {arms[0].name} / transformers decode tokens/s = {ratio:.2f}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if summary:
        print(f"ratio: {min(summary):.2f}")


if __name__ == "__main__":
    main()
