"""Batching policy benchmark (the paper's adaptive vs eager / fixed-size / fixed-timeout).

N concurrent greedy text completions, one thread each, drive the serving core
directly (prefill, then one decode forward per token, as the text-completion
inferlet does). For each policy we print requests/s; the last line is
`ratio: X`, the adaptive policy's throughput over the best other policy's.

Each policy makes its own mix of batch shapes, and a new shape costs an XLA
compilation. Every policy first runs one untimed round; shapes that still
turn up new in the timed round are compiled there, and that compile time
(reported) is taken out of the throughput, which is about batching, not XLA.

    python benchmarks/batching_policy.py [MODEL] [--requests 64] [--max-new 8]

MODEL is a known model name or a checkpoint directory (default: the default model).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from typing import Any, Sequence

from jax import monitoring

from common import cpu_model
from engine_jax.batch import Sample
from pie_runtime import ServingCore

POLICY_ORDER = ("adaptive", "greedy", "eager", "fixed-size", "fixed-timeout")

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "The capital of France is",
    "In the beginning there was",
    "Here is a short poem about the sea:",
    "Large language models are",
    "The recipe calls for two cups of",
]


def complete(core: ServingCore, name: str, prompt: Sequence[int], max_new: int) -> list[int]:
    """One greedy completion through the serving core: prefill, then decode token by token."""
    page_size = core.page_size
    inst = core.open_instance(name)
    try:
        queue = inst.create_queue(0)
        pages: list[int] = []
        seq_len = 0
        new = list(prompt)
        out: list[int] = []
        for _ in range(max_new):
            need = math.ceil((seq_len + len(new)) / page_size) - len(pages)
            if need > 0:
                pages += queue.allocate_pages(need)
            positions = list(range(seq_len, seq_len + len(new)))
            seq_len += len(new)
            last = seq_len - (len(pages) - 1) * page_size
            (token,) = queue.forward(new, positions, pages, last, None, [Sample(len(new) - 1)]).result()
            out.append(int(token))
            new = [int(token)]
        return out
    finally:
        core.close_instance(name)


class CompileTimer:
    """Sums the time JAX spends tracing, lowering and compiling (or loading cached executables)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/") or event == "/jax/compilation_cache/cache_retrieval_time_sec":
            self.seconds += duration


COMPILE_TIMER = CompileTimer()


def run_round(
    engine: Any, policy: str, prompts: list[list[int]], max_new: int, **policy_args: Any
) -> tuple[float, float, Any]:
    """Runs every prompt concurrently under `policy`; returns (requests/s
    excluding compilation, compile seconds, stats)."""
    core = ServingCore(engine, policy=policy, **policy_args).start()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            complete(core, f"{policy}-{i}", prompts[i], max_new)
        except BaseException as exc:  # reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    compiled_before = COMPILE_TIMER.seconds
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    compile_seconds = COMPILE_TIMER.seconds - compiled_before
    stats = core.stats
    core.stop()
    if errors:
        raise RuntimeError(f"{policy}: {len(errors)} requests failed, first: {errors[0]!r}")
    return len(prompts) / max(elapsed - compile_seconds, 1e-9), compile_seconds, stats


def load_engine(model: str | None, page_size: int, num_pages: int | None) -> Any:
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from engine_jax.registry import DEFAULT_MODEL

    return Engine(load_model(model or DEFAULT_MODEL), page_size=page_size, num_pages=num_pages)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model name or checkpoint directory")
    parser.add_argument("--requests", type=int, default=64, help="concurrent completions")
    parser.add_argument("--max-new", type=int, default=8, help="tokens generated per completion")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--fixed-batch-size", type=int, default=32)
    parser.add_argument("--fixed-timeout-ms", type=float, default=20.0)
    parser.add_argument("--policies", default=",".join(POLICY_ORDER))
    args = parser.parse_args(argv)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if "adaptive" not in policies or len(policies) < 2:
        parser.error("--policies must include adaptive and at least one other policy")

    engine = load_engine(args.model, args.page_size, None)
    texts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(args.requests)]
    prompts = [list(engine.tokenizer.encode(t)) for t in texts]
    print(f"CPU: {cpu_model()}")
    print(f"{args.requests} concurrent greedy completions, {args.max_new} new tokens each, page size {args.page_size}")

    results: dict[str, float] = {}
    for policy in policies:
        policy_args = dict(fixed_batch_size=args.fixed_batch_size, fixed_timeout_ms=args.fixed_timeout_ms)
        run_round(engine, policy, prompts, args.max_new, **policy_args)  # compiles its shapes
        rps, compile_seconds, stats = run_round(engine, policy, prompts, args.max_new, **policy_args)
        results[policy] = rps
        print(
            f"{policy:>14}: {rps:8.2f} req/s  steps {stats.steps:5d}  "
            f"mean batch {stats.mean_batch_requests:5.1f}  max batch {stats.max_batch_requests:3d}  "
            f"engine busy {stats.engine_seconds:6.2f} s  compile {compile_seconds:5.2f} s"
        )
    best_other = max((p for p in results if p != "adaptive"), key=results.__getitem__)
    print(f"best other policy: {best_other}")
    print(f"ratio: {results['adaptive'] / results[best_other]:.2f}")


if __name__ == "__main__":
    main()
