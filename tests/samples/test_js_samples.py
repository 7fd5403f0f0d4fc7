"""The JavaScript samples end to end: built by pie-build (componentize-js), run by pie-run,
compared with the Python samples on the same model.

Needs Node.js and npm (pie-build installs its pinned toolchain on first use);
without them the build fails with the error that says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.samples.conftest import build_and_precompile

PROMPTS = ["The capital of France is", "Once upon a time, in a land far"]


@pytest.fixture(scope="module")
def components(samples_pie_home: None) -> dict[str, Path]:
    return {f"{name}.{kind}": build_and_precompile(f"{name}.js" if kind == "js" else name)
            for name in ("text_completion", "parallel_generation") for kind in ("js", "py")}


def _stdout(run) -> str:
    return "\n".join([*run.messages, run.result])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_completion_js_equals_the_python_sample(components, pie_run, prompt):
    args = ("--prompt", prompt, "--max-tokens", 12)
    js = pie_run(components["text_completion.js"], *args)
    assert js.result == pie_run(components["text_completion.py"], *args).result


def test_text_completion_js_gives_different_completions_for_different_prompts(components, pie_run):
    # Guards the equality above: a JS SDK that ignored the prompt would still
    # equal nothing but itself.
    results = {pie_run(components["text_completion.js"], "--prompt", p, "--max-tokens", 12).result for p in PROMPTS}
    assert len(results) == len(PROMPTS)


@pytest.mark.parametrize("temperature, seed", [(0, 0), (1.0, 7)], ids=["greedy", "seeded"])
def test_parallel_generation_js_equals_the_python_sample(components, pie_run, temperature, seed):
    """Forks generated concurrently (Promise.all): greedy and seeded sampling give
    the Python sample's continuations, and the forks share engine steps."""
    args = ("--prompt", PROMPTS[1], "--n", 3, "--max-tokens", 10, "--temperature", temperature, "--seed", seed)
    js = pie_run(components["parallel_generation.js"], *args)
    assert _stdout(js) == _stdout(pie_run(components["parallel_generation.py"], *args))
    # One framed line (pie-run escapes the forks' line breaks as `\\n`) with the three forks in order.
    assert re.findall(r"(?:^|\\n)\[(\d+)\] ", _stdout(js)) == ["0", "1", "2"], _stdout(js)
    assert int(re.search(r"max (\d+)", js.stderr).group(1)) >= 3, js.stderr


def test_help_shows_the_declared_arguments(components, pie_run):
    run = pie_run(components["parallel_generation.js"], "--help")
    text = _stdout(run)
    assert text.startswith("usage: parallel-generation-js [options]")
    assert "Generates several continuations of a prompt that share its KV cache." in text
    for flag, note in (("--prompt STR", "Shared prefix. (default: 'Once upon a time')"),
                       ("--n INT", "(default: 4)"), ("--max-tokens INT", "(default: 32)"),
                       ("--temperature FLOAT", "(default: 0.8)"), ("--seed INT", "(default: 0)")):
        assert any(line.strip().startswith(flag) and line.rstrip().endswith(note) for line in text.splitlines()), flag
