"""The engine against llama.cpp on the same SmolLM2-135M weights: decode and prefill, same run.

    pip install -e '.[bench]'      # llama-cpp-python (builds llama.cpp from source, ~10 min)
    PYTHONPATH=. .venv/bin/python benchmarks/vs_llamacpp.py [--quick] [--repeats 5] [--steps 48]
        [--context 128] [--prefill 512] [--batches 1 16] [--threads 2] [--extra Q8_0 Q4_1]

Both arms run the default model's weights: the engine dequantises the
registry's Q4_1 GGUF to float32 when it loads it; llama.cpp's own quantizer
(``llama_model_quantize``, allowed to requantize) turns the same file into F32
and F16 GGUFs (and Q8_0 as extra information), written once to
``$PIE_HOME/llamacpp/`` (default ``~/.cache/pie``). ``Q4_1`` is the source file itself.

Every arm runs in its own process (``--worker ARM``, driven over stdin/stdout),
loaded and warmed up once (compiling every shape it meets); then each measurement
goes round the arms in turn, the order reversed every repeat, so load on a
shared machine hits all arms alike. Per repeat and arm:

* decode at batch B: B random prompts of ``--context`` tokens are prefilled
  (untimed), then ``--steps`` greedy decode steps of all B sequences at once
  are timed one by one; the figure is the median ms per step. Ours:
  ``Engine.step`` (host preparation, the jitted step, greedy sampling, fetch).
  llama.cpp: one ``llama_decode`` of a B-token batch (one token per sequence,
  ``n_seq_max`` = max batch) plus the argmax of each row of logits in numpy.
* prefill: one fresh prompt of ``--prefill`` random tokens in one step, next
  token's logits wanted (llama.cpp: ``n_batch = n_ubatch`` >= the prompt).

The table gives the median over repeats of each figure, and each of ours as a
ratio to llama.cpp F32 and F16 (lower is faster). llama.cpp keeps its default
KV cache (F16) and attention settings, with ``--threads`` threads; the engine
uses XLA's default (all cores). The greedy tokens of ours and llama.cpp F32
are compared as a sanity check (same weights; different summation order and
KV precision can flip near-ties). The last line is ``ratio: X``, X = ours /
llama.cpp F32 ms per step at the largest batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cpu_model  # noqa: E402

INSTALL_HINT = "llama-cpp-python is not installed: run `pip install -e '.[bench]'` (builds llama.cpp, ~10 minutes)"
# llama.cpp's ftype ids (llama.h, enum llama_ftype) of the arms it builds from the source GGUF.
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7}
BASE_ARMS = ("ours", "F32", "F16")


# llama.cpp's log callback (kept referenced while llama.cpp may call it): its per-tensor and
# per-load chatter would bury the table.
_SILENT_LOG: list = []


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise SystemExit(f"{INSTALL_HINT}\n({exc})") from None
    if not _SILENT_LOG:
        _SILENT_LOG.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_SILENT_LOG[0], None)
    return llama_cpp


def source_gguf() -> Path:
    from engine_jax.registry import DEFAULT_MODEL, get_spec, locate_source

    return locate_source(get_spec(DEFAULT_MODEL))


def llama_gguf(kind: str) -> Path:
    """The default model as a GGUF of ``kind`` (F32, F16, Q8_0 made by llama.cpp's quantizer; Q4_1 the source)."""
    from engine_jax.registry import pie_home

    source = source_gguf()
    if kind == "Q4_1":
        return source
    out = pie_home() / "llamacpp" / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if out.exists():
        return out
    llama_cpp = import_llama_cpp()
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not convert {source} to {kind}")
    partial.rename(out)
    return out


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(count)]


# ------------------------------------------------------------------------------------------ the arms


class OursArm:
    def __init__(self, args: dict) -> None:
        from engine_jax.engine import Engine
        from engine_jax.loader import load_model
        from engine_jax.registry import DEFAULT_MODEL

        model = load_model(DEFAULT_MODEL)
        page_size = 16
        longest = max(args["context"] + args["steps"] + 8, args["prefill"])
        pages = max(args["batches"]) * -(-longest // page_size) + 8
        self.engine = Engine(model, page_size=page_size, num_pages=pages)
        self.vocab = model.config.vocab_size

    def decode(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        from engine_decode import decode_steps

        return decode_steps(self.engine, prompts, steps, warmup=0)

    def prefill(self, prompt: list[int]) -> float:
        from engine_jax.batch import ForwardRequest, Sample

        ps, n = self.engine.page_size, len(prompt)
        pages = self.engine.pool.alloc(-(-n // ps))
        try:
            request = ForwardRequest(tokens=prompt, positions=range(n), pages=pages, last_page_len=(n - 1) % ps + 1,
                                     outputs=(Sample(index=n - 1),))
            start = time.perf_counter()
            self.engine.step([request])
            return (time.perf_counter() - start) * 1000
        finally:
            self.engine.pool.free(pages)


class LlamaArm:
    def __init__(self, kind: str, args: dict) -> None:
        L = self.L = import_llama_cpp()
        L.llama_backend_init()
        model_params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(llama_gguf(kind)).encode(), model_params)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {llama_gguf(kind)}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.max_seqs = max(args["batches"])
        per_seq = max(args["context"] + args["steps"] + 8, args["prefill"] + 8)
        ctx_params = L.llama_context_default_params()
        ctx_params.n_ctx = self.max_seqs * -(-per_seq // 256) * 256
        ctx_params.n_batch = ctx_params.n_ubatch = max(args["prefill"], args["context"], self.max_seqs)
        ctx_params.n_seq_max = self.max_seqs
        ctx_params.n_threads = ctx_params.n_threads_batch = args["threads"]
        self.ctx = L.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(ctx_params.n_batch, 0, self.max_seqs)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, wants logits) entries; the argmax of each wanted row."""
        L, b = self.L, self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, wanted) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wanted
            b.seq_id[i][0] = seq
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [i for i, e in enumerate(entries) if e[3]]
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), (self.vocab,))))
                for i in rows]

    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        self._clear()
        generated = []
        for s, p in enumerate(prompts):
            generated.append(self._decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)]))
        times = []
        for step in range(steps):
            entries = [(out[-1], len(p) + step, s, True) for s, (p, out) in enumerate(zip(prompts, generated))]
            start = time.perf_counter()
            tokens = self._decode(entries)
            times.append((time.perf_counter() - start) * 1000)
            for out, t in zip(generated, tokens):
                out.append(t)
        return times, generated

    def prefill(self, prompt: list[int]) -> float:
        self._clear()
        start = time.perf_counter()
        self._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        return (time.perf_counter() - start) * 1000


def worker(arm_name: str) -> None:
    """Serves one arm over stdin/stdout: a JSON settings line, then one JSON command per line."""
    args = json.loads(sys.stdin.readline())
    arm = OursArm(args) if arm_name == "ours" else LlamaArm(arm_name, args)
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    print(json.dumps({"vocab": arm.vocab}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "decode":
            prompts = random_prompts(cmd["batch"], args["context"], arm.vocab, cmd["seed"])
            times, tokens = arm.decode(prompts, args["steps"])
            result = {"ms": statistics.median(times), "tokens": tokens}
        else:
            result = {"ms": arm.prefill(random_prompts(1, args["prefill"], arm.vocab, cmd["seed"])[0])}
        print(json.dumps(result), file=out, flush=True)


# ------------------------------------------------------------------------------------------ the driver


class Worker:
    def __init__(self, arm: str, settings: dict) -> None:
        self.arm = arm
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", arm], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.info = self.ask(settings)

    def ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.arm} worker died (exit code {self.proc.wait()}); its log is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return 100.0 * sum(x == y for x, y in pairs) / max(1, len(pairs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repeats, 8 steps, 64-token prompts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48, help="timed greedy decode steps per repeat")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per sequence before decoding")
    parser.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill prompt")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--extra", nargs="*", default=["Q8_0"], choices=["Q8_0", "Q4_1"],
                        help="more llama.cpp arms, for information (default Q8_0)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    llama_cpp = import_llama_cpp()  # fail fast, before loading anything
    if args.quick:
        args.repeats, args.steps, args.context, args.prefill = 2, 8, 64, min(args.prefill, 128)
    settings = {"context": args.context, "steps": args.steps, "prefill": args.prefill, "batches": args.batches,
                "threads": args.threads}
    arms = list(BASE_ARMS) + [a for a in args.extra if a not in BASE_ARMS]
    print(f"CPU: {cpu_model()}")
    print(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"load average at start: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"arms: {', '.join(arms)}; {args.repeats} repeats, decode {args.steps} steps after {args.context}-token "
          f"prompts at batch {', '.join(map(str, args.batches))}; prefill {args.prefill}; llama.cpp {args.threads} "
          f"threads", flush=True)
    for kind in arms[1:]:
        print(f"llama.cpp {kind}: {llama_gguf(kind)}", flush=True)

    started = time.perf_counter()
    workers = {arm: Worker(arm, settings) for arm in arms}
    cases = [("decode", b) for b in args.batches] + [("prefill", args.prefill)]
    try:
        for op, size in cases:  # warm-up round: compiles every shape, faults in the weights
            for w in workers.values():
                w.ask({"op": op, "batch": size, "seed": 0})
        print(f"workers loaded and warmed up in {time.perf_counter() - started:.0f} s", flush=True)
        ms = {(arm, case): [] for arm in arms for case in cases}
        tokens: dict[tuple[str, int], list] = {}
        for r in range(args.repeats):
            for op, size in cases:
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    result = workers[arm].ask({"op": op, "batch": size, "seed": r + 1})
                    ms[(arm, (op, size))].append(result["ms"])
                    if r == 0 and op == "decode":
                        tokens[(arm, size)] = result["tokens"]
    finally:
        for w in workers.values():
            w.close()

    print(f"\nmedian ms (per decode step, per prefill) over {args.repeats} repeats; load average now "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    label = {("decode", b): f"decode batch {b}" for b in args.batches} | {("prefill", args.prefill): f"prefill {args.prefill}"}
    print(f"| {'':16} | " + " | ".join(f"{'ours' if a == 'ours' else 'llama.cpp ' + a:>14}" for a in arms)
          + " | ours / F32 | ours / F16 |")
    print("|" + "---|" * (len(arms) + 3))
    medians = {key: statistics.median(v) for key, v in ms.items()}
    for case in cases:
        row = [medians[(a, case)] for a in arms]
        print(f"| {label[case]:16} | " + " | ".join(f"{v:14.2f}" for v in row)
              + f" | {row[0] / medians[('F32', case)]:10.2f} | {row[0] / medians[('F16', case)]:10.2f} |")
    for b in args.batches:
        print(f"greedy tokens of ours equal to llama.cpp F32's at batch {b}: "
              f"{agreement(tokens[('ours', b)], tokens[('F32', b)]):.1f}%")
    print(f"total {time.perf_counter() - started:.0f} s")
    top = ("decode", max(args.batches))
    print(f"ratio: {medians[('ours', top)] / medians[('F32', top)]:.2f}")


if __name__ == "__main__":
    main()
