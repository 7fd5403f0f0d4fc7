"""Inferlet overhead: time per output token of the text-completion inferlet vs the engine's native loop.

Both arms run the same model, the same prompt (BOS + tokens, as the inferlet
fills it), greedy, the same number of new tokens, on the same engine in this
process:

- inferlet: `sample_inferlets/text_completion.py`, built and launched through
  the Host / ServingCore path `pie-run` uses (one Wasm instance per request,
  N launched at once, adaptive batching), once per `--decode-run` length: the
  scheduling hint (`runtime.scheduling`) that makes the SDK hand its decode
  passes over that many per `forward` call (1 = one call per token);
- native: `engine_jax.generate.generate` over the N prompts (one prefill
  step, then one batched decode step per token).

Time per output token (TPOT) is the mean start-to-start interval between
consecutive engine steps that decode all N requests (one token each), taken
from timestamps of every engine step (`common.StepRecorder`): in steady state
that interval is what each request waits per token, including everything the
loop does between steps (for the inferlet: waking the instance threads, the
guest's Python, host calls, the scheduler's batching). The mean, not the
median, so that a gap paid once per run of passes counts in full. Instance
launch, prefill and compilation are outside it. Arms are interleaved and
repeated and the figure is the median over runs. The end-to-end time of a run
(launch + prefill + decode) is printed too. Every run is checked to produce
exactly the requested number of tokens (no early EOS), and the inferlet's text
against the native loop's.

    PYTHONPATH=. .venv/bin/python benchmarks/inferlet_overhead.py [--model M] [--concurrency 1 16] [--decode-run 1 8]

Last line: `ratio: X`, X = inferlet TPOT / native TPOT with the server's
default decode run, the worst (largest) over the concurrencies measured
(target <= 1.05).
"""

from __future__ import annotations

import argparse
import time

from common import (
    REPO, CompileSpans, Server, StepRecorder, build_inferlet, cpu_model, interleave, load_engine, median, model_arg,
    release_components,
)

PROMPT = "Once upon a time"


def main() -> None:
    from pie_runtime.policies import DEFAULT_DECODE_RUN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--decode-run", type=int, nargs="+", default=sorted({1, DEFAULT_DECODE_RUN}),
                        help=f"decode-run hints to measure the inferlet with (default 1 and {DEFAULT_DECODE_RUN})")
    parser.add_argument("--queue-ahead", choices=("auto", "on", "off"), default="auto",
                        help="the queue-ahead hint, as `pie-run --queue-ahead` (auto: on an accelerator only)")
    args = parser.parse_args()
    if DEFAULT_DECODE_RUN not in args.decode_run:
        args.decode_run.append(DEFAULT_DECODE_RUN)

    from engine_jax.generate import generate

    engine = load_engine(args.model)
    recorder = StepRecorder(engine)
    compiles = CompileSpans()
    component = build_inferlet(REPO / "sample_inferlets" / "text_completion.py")
    server = Server(engine)
    served = server.host.model(engine.name)
    served.queue_ahead = {"auto": None, "on": True, "off": False}[args.queue_ahead]
    tok = engine.tokenizer
    prompt = list(tok.encode(args.prompt))
    bos = tok.bos_token_id if tok.bos_token_id is not None else engine.config.bos_token_id
    if bos is not None and prompt[0] != bos:
        prompt.insert(0, bos)  # what Context.fill_tokens does
    print(f"CPU: {cpu_model()}")
    print(f"model {engine.name}, prompt {args.prompt!r} ({len(prompt)} tokens), greedy, "
          f"{args.tokens} new tokens per request, {args.repeats} interleaved repeats, "
          f"decode runs {args.decode_run} (server default {DEFAULT_DECODE_RUN}), "
          f"queue-ahead {'on' if served.decodes_one_ahead else 'off'}")

    default_ratios = []
    for n in args.concurrency:
        arms = ["native", *(f"run {k}" for k in args.decode_run)]
        tpot: dict[str, list[float]] = {arm: [] for arm in arms}  # mean interval per run
        tpot_median: dict[str, list[float]] = {arm: [] for arm in arms}
        gap: dict[str, list[float]] = {arm: [] for arm in arms}
        wall: dict[str, list[float]] = {arm: [] for arm in arms}
        guest_cpu: dict[str, list[float]] = {arm: [] for arm in arms}
        steps: dict[str, list[float]] = {arm: [] for arm in arms}
        texts: dict[str, str] = {}

        def record(arm: str, mark: int, started: float) -> float:
            elapsed = time.time() - started
            intervals = recorder.intervals(mark, n)
            tpot[arm].append(sum(intervals) / len(intervals))
            tpot_median[arm].append(median(intervals))
            gap[arm].append(sum(recorder.gaps(mark, n)) / len(intervals))
            # A batch mix never seen before compiles (about a second each on
            # this CPU even from the persistent cache): not the loop's cost.
            wall[arm].append(elapsed - compiles.within(started, started + elapsed))
            steps[arm].append(len(recorder.records) - mark)
            return wall[arm][-1]

        def inferlet_arm(run: int):
            def go() -> float:
                served.decode_run = run
                mark, started = recorder.mark(), time.time()
                r = server.run(component, [["--prompt", args.prompt, "--max-tokens", str(args.tokens)]] * n)
                generated = r.stats["tokens_generated"]
                if generated < n * args.tokens:
                    raise SystemExit(f"inferlet stopped early ({generated} of {n * args.tokens} tokens): "
                                     "choose another --prompt")
                guest_cpu[f"run {run}"].append(sum(r.cpu) / (n * args.tokens))
                texts[f"run {run}"] = r.values[0]
                return record(f"run {run}", mark, started)
            return go

        def native_run() -> float:
            mark, started = recorder.mark(), time.time()
            out = generate(engine, [prompt] * n, args.tokens)
            texts["native"] = tok.decode(out[0])
            return record("native", mark, started)

        runners = {"native": native_run, **{f"run {k}": inferlet_arm(k) for k in args.decode_run}}
        # Warm-up: compiles every batch bucket the arms touch, loads the component.
        for go in runners.values():
            go()
        same = all(text == texts["native"] for text in texts.values())
        for d in (tpot, tpot_median, gap, wall, guest_cpu, steps):
            for arm in d:
                d[arm].clear()

        interleave(runners, args.repeats)
        native = median(tpot["native"])
        print(f"concurrency {n}: same greedy text in every arm: {same}")
        print(f"  {'arm':8} {'TPOT (mean)':>12} {'ratio':>6} {'TPOT (median)':>14} {'ratio':>6} "
              f"{'gap/step':>9} {'steps':>6} {'CPU/token':>10} {'end-to-end*':>11}")
        for arm in arms:
            ratio = median(tpot[arm]) / native
            ratio_median = median(tpot_median[arm]) / median(tpot_median["native"])
            cpu = f"{median(guest_cpu[arm]) * 1e3:.2f} ms" if guest_cpu[arm] else "-"
            print(f"  {arm:8} {median(tpot[arm]) * 1e3:9.2f} ms {ratio:6.3f} {median(tpot_median[arm]) * 1e3:11.2f} ms "
                  f"{ratio_median:6.3f} {median(gap[arm]) * 1e3:6.2f} ms {median(steps[arm]):6.0f} {cpu:>10} "
                  f"{median(wall[arm]) * 1e3:8.1f} ms")
            if arm == f"run {DEFAULT_DECODE_RUN}":
                default_ratios.append(ratio)
                per_repeat = [i / nat for i, nat in zip(tpot[arm], tpot["native"])]
                print(f"    (default) per-repeat TPOT ratios " + ", ".join(f"{x:.3f}" for x in per_repeat))
        print("  * launch + prefill + decode, compilation time taken out")
        print(f"  TPOT ratio inferlet/native at concurrency {n} (decode run {DEFAULT_DECODE_RUN}): "
              f"{default_ratios[-1]:.3f}")
    server.stop()
    del component
    release_components()
    print(f"ratio: {max(default_ratios):.3f}")


if __name__ == "__main__":
    main()
