"""Two processes on loopback run one tensor-parallel engine (jax.distributed, gloo collectives).

Each process is a real `pie-run` (or `pie-serve`) with one CPU device;
process 0 runs the inferlet (or serves), process 1 follows. Their mesh spans
both, so every step's all-reduces cross the process boundary.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.components import REPO, built_component
from tests.runtime.guests.fixtures import TEST_PIE_HOME

PROMPT = "Return a new list containing all items from the iterable"
ENGINE = ["--page-size", "32", "--kv-pages", "16"]
COMPLETION = ["--prompt", PROMPT, "--max-tokens", "8"]
EXIT_PROCESS_LOST = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pie_run(*argv: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    env = dict(os.environ, PIE_HOME=str(TEST_PIE_HOME),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return subprocess.Popen([sys.executable, "-m", "pie_runtime.cli", *argv], env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def group_flags(model: Path) -> list[str]:
    return [*ENGINE, "--model", str(model), "--tensor-parallel", "2", "--coordinator", f"127.0.0.1:{free_port()}",
            "--num-processes", "2"]


def group(wasm: Path, model: Path, *args: str, stdin=subprocess.DEVNULL) -> tuple[subprocess.Popen, subprocess.Popen]:
    """(leader, follower) of a two-process engine running ``wasm`` with inferlet ``args``."""
    flags = group_flags(model)
    follower = pie_run(str(wasm), *flags, "--process-id", "1")
    leader = pie_run(str(wasm), *flags, "--process-id", "0", "--", *args, stdin=stdin)
    return leader, follower


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # the distributed runtime catches SIGTERM
        out, err = process.communicate()
        pytest.fail(f"process did not finish in {timeout}s:\n{err[-3000:]}")
    return process.returncode, out, err


@pytest.fixture(scope="module")
def mistral_dir(small_model_dir) -> Path:
    return small_model_dir("mistral")


@pytest.fixture(scope="module")
def alone(mistral_dir) -> str:
    """pie-run's output for the completion, on one process and one device."""
    wasm = built_component("text_completion")
    code, out, err = finish(pie_run(str(wasm), *ENGINE, "--model", str(mistral_dir), "--", *COMPLETION))
    assert code == 0, err
    return out


def test_two_processes_complete_like_one(mistral_dir, alone):
    leader, follower = group(built_component("text_completion"), mistral_dir, *COMPLETION)
    code, out, err = finish(leader)
    assert code == 0, err
    assert out == alone and out.strip()  # stdout holds only the completion (gloo's chatter goes to stderr)
    assert "joining 2 processes" in err and "tensor parallel over 2 cpu devices" in err
    code, out, err = finish(follower)
    assert code == 0 and out == "", err
    assert "following process 0" in err and "the leader finished" in err


def kill_after_one_turn(model: Path, victim: str) -> tuple[int, str, float]:
    """Runs the chat inferlet on two processes; after one whole turn (both processes took part)
    kills ``victim`` ("leader" or "follower") and sends another line. The survivor's exit status,
    stderr and the seconds it took to exit after the kill."""
    leader, follower = group(built_component("chat"), model, "--max-tokens", "4", stdin=subprocess.PIPE)
    try:
        leader.stdin.write("hello\n")
        leader.stdin.flush()
        assert '"reply"' in leader.stdout.readline()
        killed_process, survivor = (leader, follower) if victim == "leader" else (follower, leader)
        killed_process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        if victim == "follower":
            leader.stdin.write("and now?\n")
            leader.stdin.flush()
        code, _, err = finish(survivor, timeout=60)
        return code, err, time.monotonic() - killed
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_leader_reports_a_killed_follower_within_seconds(mistral_dir):
    """The leader's idle ping (or the next turn's step) fails: it reports the lost process, the
    instance ends with that error, and the leader exits with 3."""
    code, err, elapsed = kill_after_one_turn(mistral_dir, "follower")
    assert code == EXIT_PROCESS_LOST, err[-3000:]
    assert "a process of the multi-host engine is gone" in err
    assert elapsed < 15, elapsed


def test_follower_exits_when_the_leader_is_killed(mistral_dir):
    code, err, elapsed = kill_after_one_turn(mistral_dir, "leader")
    assert code == EXIT_PROCESS_LOST, err[-3000:]
    assert "the leader (process 0) is gone" in err
    assert elapsed < 15, elapsed


def test_pie_serve_on_two_processes_serves_then_exits_when_a_follower_dies(mistral_dir, alone, tmp_path):
    """pie-serve: process 0 serves (an OpenAI completion equal to pie-run's on one device), process 1
    only follows; when the follower is killed the server fails what runs and exits with 3."""
    import openai

    from pie_runtime.messaging import frame_line
    from tests.server.conftest import start_server

    flags = group_flags(mistral_dir)
    env = dict(os.environ, PIE_HOME=str(TEST_PIE_HOME),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    with open(tmp_path / "follower.log", "wb") as log:
        follower = subprocess.Popen([sys.executable, "-m", "pie_runtime.server.cli", *flags, "--process-id", "1"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        server = start_server(mistral_dir, tmp_path / "leader", *flags, "--process-id", "0",
                              env={"XLA_FLAGS": ""})
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["alice"], max_retries=0,
                                   timeout=120)
            reply = client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=8)
            assert frame_line(reply.choices[0].text) == alone.splitlines()[-1]
            assert "following process 0" in (tmp_path / "follower.log").read_text()
            follower.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            code = server.process.wait(60)
            elapsed = time.monotonic() - killed
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()
        assert code == EXIT_PROCESS_LOST, server.log()[-3000:]
        assert "a process of the multi-host engine is gone" in server.log()
        assert elapsed < 15, elapsed
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()
