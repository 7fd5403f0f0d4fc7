"""Inferlet overhead: time per output token of the text-completion inferlet vs the engine's native loop.

Both arms run the same model, the same prompt (BOS + tokens, as the inferlet
fills it), greedy, the same number of new tokens, on the same engine in this
process:

- inferlet: `sample_inferlets/text_completion.py`, built and launched through
  the Host / ServingCore path `pie-run` uses (one Wasm instance per request,
  N launched at once, adaptive batching);
- native: `engine_jax.generate.generate` over the N prompts (one prefill
  step, then one batched decode step per token).

Time per output token (TPOT) is the median start-to-start interval between
consecutive engine steps that decode all N requests (one token each), taken
from timestamps of every engine step (`common.StepRecorder`): in steady state
that interval is what each request waits per token, including everything the
loop does between steps (for the inferlet: waking the instance threads, the
guest's Python, host calls, the scheduler's batching). Instance launch,
prefill and compilation are outside it. Each run contributes the median of
its intervals; arms are interleaved and repeated and the figure is the median
over runs. The end-to-end time of a run (launch + prefill + decode) is printed
too. Every run is checked to produce exactly the requested number of tokens
(no early EOS), and the inferlet's text against the native loop's.

    PYTHONPATH=. .venv/bin/python benchmarks/inferlet_overhead.py [--model M] [--concurrency 1 16]

Last line: `ratio: X`, X = inferlet TPOT / native TPOT, the worst (largest)
over the concurrencies measured (target <= 1.05).
"""

from __future__ import annotations

import argparse
import time

from common import (
    REPO, Server, StepRecorder, build_inferlet, fmt_samples, interleave, load_engine, median, model_arg, percentile,
    release_components,
)

PROMPT = "Once upon a time"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()

    from engine_jax.generate import generate

    engine = load_engine(args.model)
    recorder = StepRecorder(engine)
    component = build_inferlet(REPO / "sample_inferlets" / "text_completion.py")
    server = Server(engine)
    tok = engine.tokenizer
    prompt = list(tok.encode(args.prompt))
    bos = tok.bos_token_id if tok.bos_token_id is not None else engine.config.bos_token_id
    if bos is not None and prompt[0] != bos:
        prompt.insert(0, bos)  # what Context.fill_tokens does
    print(f"model {engine.name}, prompt {args.prompt!r} ({len(prompt)} tokens), greedy, "
          f"{args.tokens} new tokens per request, {args.repeats} interleaved repeats")

    ratios = []
    for n in args.concurrency:
        tpot: dict[str, list[float]] = {"inferlet": [], "native": []}
        pooled: dict[str, list[float]] = {"inferlet": [], "native": []}  # every interval of every run
        gap: dict[str, list[float]] = {"inferlet": [], "native": []}
        guest_cpu: list[float] = []
        wall: dict[str, list[float]] = {"inferlet": [], "native": []}
        last: dict[str, object] = {}

        def inferlet_run() -> float:
            mark = recorder.mark()
            r = server.run(component, [["--prompt", args.prompt, "--max-tokens", str(args.tokens)]] * n)
            generated = r.stats["tokens_generated"]
            if generated != n * args.tokens:
                raise SystemExit(f"inferlet stopped early ({generated} of {n * args.tokens} tokens): "
                                 "choose another --prompt")
            tpot["inferlet"].append(median(recorder.intervals(mark, n)))
            pooled["inferlet"].extend(recorder.intervals(mark, n))
            gap["inferlet"].append(median(recorder.gaps(mark, n)))
            guest_cpu.append(sum(r.cpu) / (n * args.tokens))
            wall["inferlet"].append(r.wall)
            last["inferlet"] = r
            return r.wall

        def native_run() -> float:
            mark = recorder.mark()
            started = time.perf_counter()
            out = generate(engine, [prompt] * n, args.tokens)
            elapsed = time.perf_counter() - started
            tpot["native"].append(median(recorder.intervals(mark, n)))
            pooled["native"].extend(recorder.intervals(mark, n))
            gap["native"].append(median(recorder.gaps(mark, n)))
            wall["native"].append(elapsed)
            last["native"] = out
            return elapsed

        # Warm-up: compiles every batch bucket both arms touch, loads the component.
        inferlet_run()
        native_run()
        same = tok.decode(last["native"][0]) == last["inferlet"].values[0]
        for d in (tpot, wall, pooled, gap):
            for arm in d:
                d[arm].clear()
        guest_cpu.clear()

        interleave({"inferlet": inferlet_run, "native": native_run}, args.repeats)
        per_repeat = [i / nat for i, nat in zip(tpot["inferlet"], tpot["native"])]
        ratio = median(tpot["inferlet"]) / median(tpot["native"])
        e2e = median(wall["inferlet"]) / median(wall["native"])
        ratios.append(ratio)
        stats = last["inferlet"].stats
        print(f"concurrency {n}:")
        print(f"  native   TPOT {fmt_samples(tpot['native'], 1e3, ' ms')}")
        print(f"  inferlet TPOT {fmt_samples(tpot['inferlet'], 1e3, ' ms')}")
        p10 = percentile(pooled["inferlet"], 0.1) / percentile(pooled["native"], 0.1)
        print(f"  10th percentile of all step intervals: native {percentile(pooled['native'], 0.1) * 1e3:.2f} ms, "
              f"inferlet {percentile(pooled['inferlet'], 0.1) * 1e3:.2f} ms (x{p10:.3f}; less sensitive to noise)")
        print(f"  loop gap between steps (median): native {median(gap['native']) * 1e3:.2f} ms, "
              f"inferlet {median(gap['inferlet']) * 1e3:.2f} ms; instance threads' CPU per token "
              f"{median(guest_cpu) * 1e3:.2f} ms (guest + host calls, summed over instances / tokens)")
        print(f"  end-to-end (launch + prefill + {args.tokens} tokens): native {median(wall['native']) * 1e3:.1f} ms, "
              f"inferlet {median(wall['inferlet']) * 1e3:.1f} ms (x{e2e:.3f})")
        print(f"  inferlet run: {stats['steps']} engine steps, mean batch {stats['mean_batch']:.1f}, "
              f"engine busy {stats['engine_seconds'] / last['inferlet'].wall:.0%} of wall")
        print(f"  same greedy text as native: {same}; per-repeat TPOT ratios "
              + ", ".join(f"{x:.3f}" for x in per_repeat))
        print(f"  TPOT ratio inferlet/native at concurrency {n}: {ratio:.3f}")
    server.stop()
    del component
    release_components()
    print(f"ratio: {max(ratios):.3f}")


if __name__ == "__main__":
    main()
