"""Serving load: N concurrent streaming OpenAI chat clients against pie-serve vs the same requests in-process.

Both arms run the same built-in completion inferlet
(pie_runtime/server/inferlets/openai_completion.py) with the same requests
(greedy chat completions of distinct prompts, `--max-tokens` each), on the
same model:

- server: a `pie-serve` subprocess on a loopback port; N `stream: true`
  requests at once over HTTP (httpx), each timed from the request to every
  content chunk of the SSE stream;
- in-process: the Host / ServingCore path `pie-run --instances N` uses, in
  this process; each instance gets the request as its first message and its
  sends are timed as they arrive.

Per request: time to first token (TTFT: request to first text) and time per
output token (TPOT: first to last text over the tokens after the first).
Per arm and N: TTFT p50/p99, mean TPOT and total tokens/s. Each N is run
once per arm to compile, then `--repeats` times interleaved (server,
in-process, in-process, server, ...); figures are medians over repeats. The
two arms' texts must be equal (greedy), so both did the same work.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py [--model M] [--clients 1 16 64] [--max-tokens 64]

Last line: `ratio: X`, X = server TPOT / in-process TPOT at 16 clients (or the
largest N measured below it); target <= 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, Server, cpu_model, interleave, load_engine, model_arg

TOPICS = ["a dragon", "the sea", "a lost key", "a robot", "winter", "a city at night", "a garden", "a train"]
READY = re.compile(r"ready on (http://[0-9.]+:\d+)")


def requests_for(n: int, max_tokens: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({i})."}],
             "temperature": 0, "max_tokens": max_tokens} for i in range(n)]


def summarise(timings: list[tuple[float, float, int]], wall: float) -> dict[str, float]:
    """timings: (ttft, last-text time after start, tokens) per request."""
    ttfts = sorted(t[0] for t in timings)
    tpots = [(last - first) / (tokens - 1) for first, last, tokens in timings if tokens > 1]
    return {
        "ttft_p50": ttfts[len(ttfts) // 2],
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "tpot": statistics.mean(tpots),
        "tokens_per_s": sum(t[2] for t in timings) / wall,
    }


class InProcess:
    def __init__(self, model: str, page_size: int) -> None:
        from pie_runtime.server.app import COMPLETION_PROGRAM
        from pie_runtime.server.programs import load_program_file
        from pie_runtime.host.capabilities import Capabilities

        self.server = Server(load_engine(model, page_size=page_size))
        self.component = load_program_file("openai-completion", COMPLETION_PROGRAM, Capabilities()).program.component

    def run(self, bodies: list[dict[str, Any]]) -> tuple[dict[str, float], list[str]]:
        from pie_runtime.instance import Instance
        from pie_runtime.messaging import ClientChannel
        from pie_runtime.server.openai_schema import ChatRequest

        marks: list[list[float]] = [[] for _ in bodies]
        texts = [""] * len(bodies)
        lock = threading.Lock()

        def on_send(i: int, message: str) -> None:
            event = json.loads(message)
            if event["t"] == "d":
                with lock:
                    marks[i].append(time.perf_counter())
                    texts[i] += event["x"]

        instances = []
        for i, body in enumerate(bodies):
            client = ClientChannel(on_send=lambda m, i=i: on_send(i, m))
            client.deliver(json.dumps({**ChatRequest.model_validate({"model": "m", **body}).to_inferlet(),
                                       "prefix_cache": True}))
            client.close_input()
            instances.append(Instance(self.server.host, self.component, client=client))
        started = time.perf_counter()
        for inst in instances:
            inst.start()
        outcomes = [inst.wait(1200) for inst in instances]
        wall = time.perf_counter() - started
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise RuntimeError(failed[0].describe())
        usage = [json.loads(o.value)["completion_tokens"] for o in outcomes]
        return summarise([(m[0] - started, m[-1] - started, n) for m, n in zip(marks, usage)], wall), texts

    def stop(self) -> None:
        self.server.stop()


class OverHttp:
    def __init__(self, model: str, page_size: int, warmup: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="pie-serve-bench-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pie_runtime.server.cli", "--model", model, "--port", "0",
               "--page-size", str(page_size), "--warmup-batches", warmup, "--warmup-prompts", "",
               "--max-tenant-instances", "256"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 900
        while True:
            text = Path(self.log.name).read_text(errors="replace")
            found = READY.search(text)
            if found:
                self.url = found.group(1)
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pie-serve did not start:\n{text[-3000:]}")
            time.sleep(0.5)
        import httpx

        self.model = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def run(self, bodies: list[dict[str, Any]]) -> tuple[dict[str, float], list[str]]:
        return asyncio.run(self._run(bodies))

    async def _run(self, bodies: list[dict[str, Any]]) -> tuple[dict[str, float], list[str]]:
        import httpx

        async def one(client: httpx.AsyncClient, body: dict[str, Any], started: float) -> tuple:
            marks, text, usage = [], "", None
            payload = {"model": self.model, **body, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", self.url + "/v1/chat/completions", json=payload) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            marks.append(time.perf_counter())
                            text += choice["delta"]["content"]
            return (marks[0] - started, marks[-1] - started, usage), text

        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(timeout=1200, limits=limits) as client:
            started = time.perf_counter()
            results = await asyncio.gather(*(one(client, b, started) for b in bodies))
            wall = time.perf_counter() - started
        return summarise([r[0] for r in results], wall), [r[1] for r in results]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)
        os.unlink(self.log.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arg(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()
    print(f"machine: {cpu_model()}", flush=True)
    warm = ",".join(str(1 << k) for k in range(max(args.clients).bit_length()))
    http = OverHttp(args.model, args.page_size, warm)
    local = InProcess(args.model, args.page_size)
    figures: dict[int, dict[str, dict[str, float]]] = {}
    try:
        for n in args.clients:
            bodies = requests_for(n, args.max_tokens)
            texts: dict[str, list[str]] = {}

            def arm(name: str, runner: Any) -> Any:
                def go() -> dict[str, float]:
                    summary, texts[name] = runner.run(bodies)
                    return summary
                return go

            arms = {"server": arm("server", http), "in-process": arm("in-process", local)}
            for go in arms.values():  # compile every shape this N meets
                go()
            samples = interleave(arms, args.repeats)
            if texts["server"] != texts["in-process"]:
                raise RuntimeError(f"the arms generated different texts at {n} clients")
            figures[n] = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                          for name, runs in samples.items()}
            for name, f in figures[n].items():
                print(f"{n:3d} clients {name:10s}: TTFT p50 {f['ttft_p50'] * 1000:7.1f} ms, p99 "
                      f"{f['ttft_p99'] * 1000:7.1f} ms; TPOT {f['tpot'] * 1000:6.2f} ms; "
                      f"{f['tokens_per_s']:7.1f} tokens/s", flush=True)
            print(f"{n:3d} clients server/in-process TPOT: "
                  f"{figures[n]['server']['tpot'] / figures[n]['in-process']['tpot']:.3f}", flush=True)
    finally:
        http.stop()
        local.stop()
    at = max((n for n in figures if n <= 16), default=min(figures))
    print(f"ratio: {figures[at]['server']['tpot'] / figures[at]['in-process']['tpot']:.3f}")


if __name__ == "__main__":
    main()
