"""constrained_decoding.py end to end: the tiny random model writes gibberish, yet
under a grammar every output (greedy, sampled, seeded) is valid JSON for the
schema, a full regex match, or a sentence of the EBNF grammar."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from tests.samples.conftest import MODEL_OPTS, build_and_precompile

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
REGEX = "[0-9]{3}-[a-z]{2}"
EBNF = 'root ::= answer "." \nanswer ::= "yes" | "no" | "maybe " [0-9]'
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def component(samples_pie_home: None) -> Path:
    return build_and_precompile("constrained_decoding")


def _results(run) -> list[str]:
    """Every instance's output: the result line, or '[k] text' lines with --instances."""
    lines = [*run.messages, run.result]
    tagged = [m.group(1) for m in (re.fullmatch(r"\[\d+\] (.*)", line) for line in lines) if m]
    return tagged or [run.result]


def _valid_json(text: str) -> bool:
    value = json.loads(text)
    return (isinstance(value, dict) and set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
            and type(value["n"]) is int and 0 <= value["n"] <= 99)


def _constraint(kind: str) -> tuple[str, str]:
    return {"schema": ("--schema", json.dumps(SCHEMA)), "regex": ("--regex", REGEX), "ebnf": ("--ebnf", EBNF)}[kind]


def _valid(kind: str, text: str) -> bool:
    if kind == "schema":
        return _valid_json(text)
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    return re.fullmatch(r"(yes|no|maybe [0-9])\.", text) is not None


@pytest.mark.parametrize("kind", ["schema", "regex", "ebnf"])
def test_greedy_output_satisfies_the_constraint(component, pie_run, kind):
    run = pie_run(component, *_constraint(kind), "--prompt", "Reply:", "--max-tokens", MAX_TOKENS)
    assert _valid(kind, run.result), run.result


@pytest.mark.parametrize("kind", ["schema", "regex"])
def test_sampled_outputs_satisfy_the_constraint_and_seeds_reproduce(component, pie_run, kind):
    # Four unseeded instances draw from the server's stream (different
    # outputs); the two last runs share a seed and must agree.
    unseeded = _results(pie_run(component, *_constraint(kind), "--temperature", "1.5", "--max-tokens", MAX_TOKENS,
                                options=("--instances", "4")))
    seeded = _results(pie_run(component, *_constraint(kind), "--temperature", "1.5", "--seed", "7",
                              "--max-tokens", MAX_TOKENS, options=("--instances", "2")))
    assert len(unseeded) == 4 and len(seeded) == 2
    assert all(_valid(kind, text) for text in unseeded + seeded), unseeded + seeded
    assert len(set(unseeded)) > 1, unseeded
    assert seeded[0] == seeded[1]


def test_an_invalid_schema_is_a_clear_error(component, sample_model_dir):
    from pie_runtime.cli import main

    err = io.StringIO()
    argv = [str(component), "--model", str(sample_model_dir), *MODEL_OPTS, "--",
            "--schema", '{"type": "object", "properties": {"ok": {"type": "bogus"}}}']
    code = main(argv, stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err)
    assert code != 0
    assert "invalid-argument" in err.getvalue() and "invalid JSON schema" in err.getvalue(), err.getvalue()
    assert "bogus" in err.getvalue()
