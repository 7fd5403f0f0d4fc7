"""A real `pie-serve` process on a free loopback port, and what the tests use to talk to it.

The server runs the tiny random Mistral model of the sample tests (its greedy
output depends on the context) with two tenants, alice and bob. Tests
check what the server itself reports (`/metrics`: instances, KV pages,
threads, open files), not what a program says about itself.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.guests.fixtures import TEST_PIE_HOME

REPO = Path(__file__).resolve().parents[2]
FAMILY = "mistral"
PAGE_SIZE = 4
KV_PAGES = 256
TOKENS = {"alice": "sk-alice-0123456789abcdef", "bob": "sk-bob-0123456789abcdef0"}
READY = re.compile(r"ready on (http://[0-9.]+:\d+)")
START_TIMEOUT = 300.0
PROMPT = "The capital of France is"
MAX_TOKENS = 12


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    log_path: Path
    model: str = ""
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))

    @property
    def ws_url(self) -> str:
        return "ws://" + self.url.removeprefix("http://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {"name{label=value,...}": value}."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def idle_counts(self) -> dict[str, float]:
        m = self.metrics()
        return {
            "instances": m.get("pie_instances{state=running}", 0) + m.get("pie_instances{state=detached}", 0),
            "kv_used": m["pie_kv_pages{state=used}"],
            "threads": m["pie_threads"],
            "fds": m["process_open_fds"],
        }

    def settled_counts(self, timeout: float = 30.0) -> dict[str, float]:
        """The idle counts once no instance runs and two readings in a row agree (a thread that
        outlives its instance for a moment, like the epoch ticker, has gone)."""
        deadline = time.monotonic() + timeout
        last = self.idle_counts()
        while True:
            time.sleep(0.3)
            counts = self.idle_counts()
            if (counts == last and counts["instances"] == 0) or time.monotonic() > deadline:
                return counts
            last = counts

    def assert_back_to(self, baseline: dict[str, float], timeout: float = 60.0) -> None:
        """Waits until instances, KV pages, threads and open files are back to `baseline` (or fewer)."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.idle_counts()
            if all(counts[k] <= baseline[k] for k in counts):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not back to idle after {timeout:.0f}s: {counts} vs {baseline}")
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(model_dir: Path, workdir: Path, *extra: str, tokens: dict[str, str] | None = TOKENS,
                 env: dict[str, str] | None = None) -> RunningServer:
    """Starts pie-serve on a free port (with ``env`` added to its environment) and waits for its ready line."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pie_runtime.server.cli", "--model", str(model_dir), "--port", "0",
           "--page-size", str(PAGE_SIZE), "--kv-pages", str(KV_PAGES), "--warmup-batches", "", "--warmup-prompts", ""]
    if tokens is not None:
        tokens_file = workdir / "tokens.toml"
        tokens_file.write_text("[tokens]\n" + "".join(f'"{t}" = "{n}"\n' for n, t in tokens.items()))
        cmd += ["--auth", str(tokens_file)]
    log_path = workdir / "server.log"
    env = {**os.environ, "PIE_HOME": str(TEST_PIE_HOME), "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*cmd, *extra], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        text = log_path.read_text(errors="replace")
        found = READY.search(text)
        if found:
            break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"pie-serve did not start (exit {process.poll()}):\n{text[-4000:]}")
        time.sleep(0.2)
    server = RunningServer(process, found.group(1), log_path)
    server.model = httpx.get(server.url + "/v1/models", timeout=30,
                             headers=_auth(server.tokens)).json()["data"][0]["id"]
    return server


def _auth(tokens: dict[str, str] | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['alice']}"} if tokens else {}


def pie_run_locally(model_dir: Path, component: Path, *args: str) -> str:
    """What `pie-run` prints last (the result, framed as one line: see messaging.frame_line) for a
    local run of `component` (one device)."""
    from pie_runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = main([str(component), "--model", str(model_dir), "--page-size", str(PAGE_SIZE), "--kv-pages",
                 str(KV_PAGES), "-q", "--", *args], stdin=io.StringIO(""), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    return out.getvalue().splitlines()[-1] if out.getvalue().strip() else ""


@pytest.fixture(scope="session")
def server_model_dir(small_model_dir: Callable[[str], Path]) -> Path:
    return small_model_dir(FAMILY)


@pytest.fixture(scope="package")
def server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the package's tests; stopped with SIGTERM at the end (it must exit 0)."""
    running = start_server(server_model_dir, tmp_path_factory.mktemp("pie-serve"),
                           "--expose", f"shout={Path(__file__).parent / 'guests' / 'shout.py'}")
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, f"pie-serve exited {code} on SIGTERM:\n{running.log()[-4000:]}"


@pytest.fixture(scope="package")
def openai_client(server: RunningServer) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["alice"], max_retries=0, timeout=300)


@pytest.fixture(scope="package")
def pie_run_plain(server_model_dir: Path, samples_built: Callable[[str], Path]) -> str:
    """pie-run's greedy completion of PROMPT on one device (what the OpenAI API must answer)."""
    return pie_run_locally(server_model_dir, samples_built("text_completion"), "--prompt", PROMPT,
                           "--max-tokens", str(MAX_TOKENS))


@pytest.fixture(scope="package")
def samples_built() -> Callable[[str], Path]:
    """name -> a sample inferlet built by pie-build (cached on disk by content)."""
    from inferlet_toolchain.build import build

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = TEST_PIE_HOME / "samples" / f"{name}.wasm"
            built[name] = Path(build(REPO / "sample_inferlets" / f"{name}.py", out, quiet=True))
        return built[name]

    return get
