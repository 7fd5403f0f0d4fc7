"""Mixed load: a long prompt arriving while others decode, with chunked prefill off and on.

N decoders (one thread each, a greedy forward per token through the serving
core) run; once each has a few tokens, a prompt of L tokens arrives on its
own instance. For every token budget (`pie-run --token-budget`; 0 = off, the
prompt runs as one step) we report the decoders' time per token over the
intervals that overlap the prompt's prefill (p50, p99, worst) and the
prompt's time to first token, each as a ratio to the budget-off arm measured
in the same run. Arms are interleaved (off, b1, b2, ... then again), each
after one untimed trial that compiles its step shapes; figures are medians
over the repeats (a trial that had to compile a new step shape is run again).
The last line is `ratio: X`, the decoders' worst time per
token under the default budget over that with chunking off, for the longest
prompt.

    PYTHONPATH=. .venv/bin/python benchmarks/mixed_load.py [--model M] [--decoders 15] [--prompts 512 2048] \
        [--budgets 0 64 128 256 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from typing import Any, Sequence

from common import cpu_model, load_engine, model_arg  # first: puts the repository on sys.path
from batching_policy import COMPILE_TIMER  # noqa: E402
from engine_jax.batch import Sample
from pie_runtime import ServingCore
from pie_runtime.policies import DEFAULT_TOKEN_BUDGET

WARM_TOKENS = 6  # tokens every decoder draws before the prompt arrives
MAX_RERUNS = 3  # a timed trial that had to compile a step shape is run again, at most this often


class Stream:
    """One sequence on its own instance and queue; pages grow as tokens are appended."""

    def __init__(self, core: ServingCore, name: str) -> None:
        self.core, self.name = core, name
        self.queue = core.open_instance(name).create_queue(0)
        self.pages: list[int] = []
        self.length = 0

    def forward(self, tokens: Sequence[int]) -> int:
        ps = self.core.page_size
        need = math.ceil((self.length + len(tokens)) / ps) - len(self.pages)
        if need > 0:
            self.pages += self.queue.allocate_pages(need)
        positions = range(self.length, self.length + len(tokens))
        self.length += len(tokens)
        last = self.length - (len(self.pages) - 1) * ps
        (token,) = self.queue.forward(tokens, positions, self.pages, last, None, [Sample(len(tokens) - 1)]).result()
        return int(token)

    def close(self) -> None:
        self.core.close_instance(self.name)


def trial(engine: Any, budget: int, decoders: int, context: int, prompt_len: int) -> dict[str, Any]:
    """One run: decoders warm up, the prompt arrives and is answered, decoders go on a little."""
    core = ServingCore(engine, token_budget=budget or None).start()
    stop = threading.Event()
    stamps: list[list[float]] = [[] for _ in range(decoders)]
    errors: list[BaseException] = []
    vocab = engine.config.vocab_size

    def decode(i: int) -> None:
        try:
            seq = Stream(core, f"decoder-{i}")
            try:
                token = seq.forward([(97 * i + 13 * k) % (vocab - 1) + 1 for k in range(context)])
                while not stop.is_set():
                    token = seq.forward([token])
                    stamps[i].append(time.perf_counter())
            finally:
                seq.close()
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(decoders)]
    for t in threads:
        t.start()
    _wait(lambda: all(len(s) >= WARM_TOKENS for s in stamps) or stop.is_set())
    long = Stream(core, "prompt")
    start = time.perf_counter()
    long.forward([(31 * k) % (vocab - 1) + 1 for k in range(prompt_len)])
    ttft = time.perf_counter() - start
    long.close()
    end = start + ttft
    _wait(lambda: all(s and s[-1] > end for s in stamps) or stop.is_set())
    stop.set()
    for t in threads:
        t.join()
    stats = core.stats
    core.stop()
    if errors:
        raise RuntimeError(f"a decoder failed: {errors[0]!r}")
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if a < end and b > start]
    before = [b - a for s in stamps for a, b in list(zip(s, s[1:]))[WARM_TOKENS - 4:] if b <= start]
    return dict(ttft=ttft, during=during, before=before, chunks=stats.prefill_chunks, steps=stats.steps)


def _wait(done: Any, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the trial did not finish in time")
        time.sleep(0.005)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(parser)
    parser.add_argument("--decoders", type=int, default=15, help="sequences decoding when the prompt arrives")
    parser.add_argument("--context", type=int, default=64, help="each decoder's own prompt length")
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048], help="long prompt lengths")
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 64, 128, 256, 512],
                        help="token budgets to compare (0 = chunking off; always measured)")
    parser.add_argument("--repeats", type=int, default=2, help="timed trials per arm (after one untimed)")
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)
    budgets = sorted(set(args.budgets) | {0})

    engine = load_engine(args.model, page_size=args.page_size)
    timer = COMPILE_TIMER  # seconds JAX spent compiling (or loading cached executables)
    print(f"cpu: {cpu_model()}")
    print(f"model {engine.name}, {args.decoders} decoders (context {args.context}) while a long prompt arrives; "
          f"budgets {budgets} (0 = chunking off, default {DEFAULT_TOKEN_BUDGET}), {args.repeats} repeats")
    worst: dict[int, float] = {}
    for prompt_len in args.prompts:
        for budget in budgets:  # untimed: compiles the arm's step shapes
            trial(engine, budget, args.decoders, args.context, prompt_len)
        runs: dict[int, list[dict[str, Any]]] = {b: [] for b in budgets}
        reruns, compiled = 0, 0.0
        for _ in range(args.repeats):
            for budget in budgets:
                for attempt in range(MAX_RERUNS + 1):
                    before = timer.seconds
                    result = trial(engine, budget, args.decoders, args.context, prompt_len)
                    if timer.seconds - before < 0.1 or attempt == MAX_RERUNS:
                        compiled += timer.seconds - before
                        break
                    reruns += 1  # which steps form depends on timing: a new shape can still turn up
                runs[budget].append(result)

        def med(budget: int, fn: Any) -> float:
            return statistics.median(fn(r) for r in runs[budget])

        summary = {b: dict(ttft=med(b, lambda r: r["ttft"]),
                           p50=med(b, lambda r: percentile(r["during"], 0.5)),
                           p99=med(b, lambda r: percentile(r["during"], 0.99)),
                           worst=med(b, lambda r: max(r["during"])),
                           idle=med(b, lambda r: percentile(r["before"], 0.5)),
                           chunks=med(b, lambda r: r["chunks"]))
                   for b in budgets}
        off = summary[0]
        print(f"\nprompt {prompt_len} tokens ({reruns} trials rerun because they compiled a step shape; "
              f"compiling in the trials kept: {compiled:.1f} s)")
        print(f"{'budget':>7} {'TTFT s':>8} {'x off':>6} | decoders' ms/token during the prefill: "
              f"{'p50':>7} {'p99':>7} {'worst':>7} {'p99 x off':>9} {'worst x off':>11} | {'idle p50':>8} {'chunks':>6}")
        for b in budgets:
            s = summary[b]
            print(f"{b or 'off':>7} {s['ttft']:8.2f} {s['ttft'] / off['ttft']:6.2f} | {'':39}"
                  f"{s['p50'] * 1e3:7.0f} {s['p99'] * 1e3:7.0f} {s['worst'] * 1e3:7.0f} "
                  f"{s['p99'] / off['p99']:9.2f} {s['worst'] / off['worst']:11.2f} | "
                  f"{s['idle'] * 1e3:8.0f} {s['chunks']:6.0f}")
        if DEFAULT_TOKEN_BUDGET in summary:
            worst[prompt_len] = summary[DEFAULT_TOKEN_BUDGET]["worst"] / off["worst"]
    if worst:
        longest = max(worst)
        print(f"\ndecoders' worst time per token, budget {DEFAULT_TOKEN_BUDGET} / off, prompt {longest}:")
        print(f"ratio: {worst[longest]:.2f}")


if __name__ == "__main__":
    main()
