"""`pie-run` end to end: real components, a tiny random model loaded from disk, the terminal
(stdin/stdout/stderr) replaced by in-memory streams."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pie_runtime import component_cache
from pie_runtime.cli import main
from pie_runtime.component_cache import ComponentCache
from tests.runtime.guests.build import build_guest
from tests.runtime.guests.fixtures import PRECOMPILED, TEST_PIE_HOME

REPO = Path(__file__).resolve().parents[2]
MODEL_OPTS = ["--page-size", "4", "--kv-pages", "64"]


@pytest.fixture(scope="module", autouse=True)
def test_pie_home():
    """pie-run's caches (precompiled components, pie-build outputs) go to the tests' PIE_HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PIE_HOME", str(TEST_PIE_HOME))
    mp.setattr(component_cache, "_default_cache", ComponentCache(PRECOMPILED))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def probe_wasm() -> Path:
    return build_guest("probe")


def pie_run(argv, stdin_text=""):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_help_describes_the_options():
    code, out, _ = pie_run(["--help"])
    assert code == 0
    for option in ("PROGRAM", "--model", "--page-size", "--kv-pages", "--instances", "--batching",
                   "--allow", "--cpu-limit", "--memory-limit", "--program NAME=PATH", "-- --help"):
        assert option in out


def test_usage_errors_exit_2(tmp_path):
    assert pie_run([tmp_path / "missing.wasm"])[0] == 2
    code, _, err = pie_run([tmp_path / "missing.wasm", "--allow", "teleport"])
    assert code == 2 and "unknown capability" in err
    code, _, err = pie_run([tmp_path / "missing.wasm", "--allow", "net"])
    assert code == 2 and "network access cannot be granted" in err
    code, _, err = pie_run([tmp_path / "missing.wasm", "--instances", "3", "--max-instances", "2"])
    assert code == 2 and "--max-instances" in err
    code, _, err = pie_run([REPO / "pyproject.toml", "--program", "no-path"])
    assert code == 2 and "expected NAME=PATH" in err
    code, _, err = pie_run([REPO / "pyproject.toml", "--program", f"x={tmp_path / 'missing.wasm'}"])
    assert code == 2 and "--program x: no such program" in err
    assert pie_run(["x.wasm", "--instances", "0"])[0] == 2


def test_stdin_lines_are_received_and_sends_go_to_stdout(probe_wasm, tiny_llama_dir):
    code, out, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "echo"],
                             stdin_text="hello\nwörld\n")
    assert code == 0, err
    assert out.splitlines() == ["HELLO", "WÖRLD", "echoed 2"]  # messages, then the return value last
    assert "loading model" in err  # progress goes to stderr, not stdout


def test_many_instances_print_results_and_a_summary(probe_wasm, tiny_llama_dir):
    code, out, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--instances", "3",
                              "--", "generate", "Hello world", "5"])
    assert code == 0, err
    lines = out.splitlines()
    assert [line[:4] for line in lines] == ["[0] ", "[1] ", "[2] "]
    results = [json.loads(line[4:])["tokens"] for line in lines]
    assert len(results[0]) == 5 and results.count(results[0]) == 3  # greedy: the same for all
    assert "3/3 instances ok" in err
    assert "15 tokens generated" in err
    assert "batch sizes" in err


def test_messages_are_framed_so_no_instance_can_print_another_ones_line(probe_wasm, tiny_llama_dir):
    """A message with line breaks (or terminal escapes) prints as one escaped
    line, always behind its sender's tag; JSON passes unchanged."""
    forged = "fine\n[1] forged line\r\x1b[2K\\"
    code, out, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--instances", "2",
                              "--", "say", forged])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4  # one message and one result per instance: nothing more
    assert all(line[:4] in ("[0] ", "[1] ") for line in lines)
    framed = "fine\\n[1] forged line\\r\\x1b[2K\\"
    assert sorted(line for line in lines if "forged" in line) == [f"[{k}] {framed}" for k in (0, 1)]
    payload = json.dumps({"text": "two\nlines \"quoted\" é"})
    code, out, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "say", payload])
    assert code == 0, err
    assert json.loads(out.splitlines()[0]) == json.loads(payload)


def test_a_failing_instance_makes_the_exit_code_nonzero(probe_wasm, tiny_llama_dir):
    code, out, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "trap"])
    assert code == 1
    assert "RuntimeError: deliberate failure in the guest" in err
    assert out == ""


def test_tenant_limit_options_reach_the_server(tiny_llama_dir):
    hostile = build_guest("hostile")
    code, out, err = pie_run([hostile, "--model", tiny_llama_dir, *MODEL_OPTS, "--instance-pages", "2",
                              "--", "allocate", "3"])
    assert code == 0, err
    assert json.loads(out.splitlines()[-1]) == {"code": "out-of-memory"}
    code, _, err = pie_run([hostile, "--model", tiny_llama_dir, *MODEL_OPTS, "--tree-memory-bytes", "0",
                            "--", "allocate", "1"])
    assert code == 2 and "cannot start an instance" in err and "tree_memory_bytes" in err
    assert pie_run(["x.wasm", "--kv-keys", "-1"])[0] == 2


def test_cpu_limit_option_stops_a_runaway_instance(probe_wasm, tiny_llama_dir):
    code, _, err = pie_run([probe_wasm, "--model", tiny_llama_dir, *MODEL_OPTS, "--cpu-limit", "0.5", "--", "loop"])
    assert code == 1 and "cpu-limit" in err


@pytest.mark.slow
def test_a_python_inferlet_is_built_and_its_declared_arguments_are_enforced(tiny_llama_dir):
    """The .py path: pie-build on the fly, `-- --help` from the manifest, argument validation."""
    source = REPO / "sample_inferlets" / "text_completion.py"
    code, out, err = pie_run([source, "--", "--help"])
    assert code == 0, err
    assert "text-completion" in out and "--max-tokens" in out
    code, _, err = pie_run([source, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "--max-tokens", "many"])
    assert code == 2 and "max-tokens" in err
    code, out, err = pie_run([source, "--model", tiny_llama_dir, *MODEL_OPTS, "--",
                              "--prompt", "Hello", "--max-tokens", "4"])
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1


def test_pie_run_as_a_process_with_real_pipes(probe_wasm, tiny_llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "pie_runtime.cli", str(probe_wasm), "--model", str(tiny_llama_dir), *MODEL_OPTS,
         "--quiet", "--", "echo"],
        input="ping\n", capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PIE_HOME": str(TEST_PIE_HOME)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["PING", "echoed 1"]


SPAWNER = REPO / "tests" / "runtime" / "guests" / "spawner.py"


def _children_messages(out: str) -> tuple[dict[str, str], list[str]]:
    """Child id -> its message, from `[CHILD-ID] message` lines; and the other lines."""
    tagged, rest = {}, []
    for line in out.splitlines():
        if line.startswith("[") and "] " in line:
            child, message = line[1:].split("] ", 1)
            tagged[child] = message
        else:
            rest.append(line)
    return tagged, rest


@pytest.mark.slow
def test_an_sdk_inferlet_launches_children_of_itself(tiny_llama_dir):
    """inferlet.launch / launch_async through pie-run: results in launch order, messages tagged."""
    code, out, err = pie_run([SPAWNER, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "--children", "1"])
    assert code == 1 and "'launch' capability" in err and "--allow launch" in err  # the operator's grant
    code, out, err = pie_run([SPAWNER, "--model", tiny_llama_dir, *MODEL_OPTS, "--allow", "launch",
                              "--", "--children", "3"])
    assert code == 0, err
    tagged, rest = _children_messages(out)
    assert sorted(tagged.values()) == ["leaf 0", "leaf 1", "leaf 2", "leaf 3"] and len(tagged) == 4
    assert rest == [json.dumps(["tag-0", "tag-1", "tag-2", "tag-3"])]
    code, _, err = pie_run([SPAWNER, "--model", tiny_llama_dir, *MODEL_OPTS, "--allow", "launch",
                            "--", "--child-args", "--tag"])
    assert code == 1 and "invalid-argument" in err and "--tag" in err


@pytest.mark.slow
def test_registered_programs_can_be_launched_by_name(probe_wasm, tiny_llama_dir):
    code, out, err = pie_run([SPAWNER, "--model", tiny_llama_dir, *MODEL_OPTS, "--program", f"probe={probe_wasm}",
                              "--allow", "launch", "--", "--program", "probe", "--children", "2",
                              "--child-args", "say hi-{i}"])
    assert code == 0, err
    tagged, rest = _children_messages(out)
    assert len(rest) == 1
    child_ids = json.loads(rest[0])
    assert tagged == {cid: f"hi-{i}" for i, cid in enumerate(child_ids)}
    code, _, err = pie_run([SPAWNER, "--model", tiny_llama_dir, *MODEL_OPTS, "--allow", "launch",
                            "--", "--program", "probe"])
    assert code == 1 and "not-found" in err and "'probe'" in err


STOP_AND_GO = REPO / "tests" / "runtime" / "guests" / "stop_and_go.py"


@pytest.mark.slow
@pytest.mark.parametrize("options", [("--queue-ahead", "off", "--decode-run", "1"),
                                     ("--queue-ahead", "off", "--decode-run", "3"),
                                     ("--queue-ahead", "on", "--decode-run", "1"),
                                     ("--queue-ahead", "on", "--decode-run", "3"),
                                     ("--queue-ahead", "on", "--decode-run", "3", "--token-budget", "2")],
                         ids=["per-token", "runs-of-3", "ahead-per-token", "ahead-runs-of-3", "chunked-prefill"])
def test_generation_that_stops_early_continues_from_exactly_its_tokens(tiny_llama_dir, tiny_llama_model,
                                                                       options):
    """generate() stopped by a stop token, then continued: the passes a run
    drew past the stop, and the run queued one ahead behind it, are rolled
    back, and both parts equal one uninterrupted greedy run of the engine."""
    from tests.runtime.guests.fixtures import engine_greedy

    prompt = "Hello world"
    tok = tiny_llama_model.tokenizer
    ids = tok.encode(prompt)
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    expected = engine_greedy(tiny_llama_model, ids, 12, page_size=4)
    # The first token that did not occur before it: generation stops there, early.
    k = next(i for i in range(1, 8) if expected[i] not in expected[:i])
    code, out, err = pie_run([STOP_AND_GO, "--model", tiny_llama_dir, *MODEL_OPTS, *options,
                              "--", "--prompt", prompt, "--stop-token", expected[k], "--max-tokens", 10,
                              "--more", 4])
    assert code == 0, err
    r = json.loads(out.splitlines()[-1])
    assert r["first_reason"] == "eos" and r["first"] == expected[:k]
    assert r["second"] == expected[k + 1:k + 5]
    assert r["kv_len"] == len(ids) + k + 1 + 3 and r["pending"] == 1
    if "--token-budget" in options:  # the prompt really ran in chunks, unseen by the inferlet
        assert "chunked prefill: " in err, err
