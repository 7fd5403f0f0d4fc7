"""parallel_generation.py: forks of one prefilled prompt, generated together.

Greedy forks must each equal one greedy run over the prompt (sharing the
prefix's pages must not change what a fork sees), their decode steps must
share engine steps, and seeded sampling must give distinct but reproducible
continuations.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pie_runtime.messaging import frame_line
from tests.samples.conftest import build_and_precompile

PROMPT = "Once upon a time, in a land far"
N, MAX_TOKENS = 3, 10


@pytest.fixture(scope="module")
def parallel_generation(samples_pie_home: None) -> Path:
    return build_and_precompile("parallel_generation")


def _stdout(run) -> str:
    """The result: one line per fork, "[i] text", joined with line feeds (which
    pie-run prints escaped, as `\\n`: one line per message or result)."""
    assert not run.messages
    return run.result


def test_greedy_forks_equal_a_single_greedy_run_and_share_steps(parallel_generation, pie_run, oracle):
    run = pie_run(parallel_generation, "--prompt", PROMPT, "--n", N, "--max-tokens", MAX_TOKENS,
                  "--temperature", 0)
    eos = tuple(oracle.tokenizer.eos_token_ids)
    ids = oracle.greedy(oracle.encode(PROMPT), MAX_TOKENS, stop=eos)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    expected = oracle.tokenizer.decode(ids)
    assert _stdout(run) == frame_line("\n".join(f"[{i}] {expected}" for i in range(N)))
    assert int(re.search(r"max (\d+)", run.stderr).group(1)) >= N, run.stderr


def test_seeded_forks_differ_from_each_other_and_repeat_across_runs(parallel_generation, pie_run):
    args = ("--prompt", PROMPT, "--n", N, "--max-tokens", MAX_TOKENS, "--temperature", 1.0, "--seed", 7)
    first, second = (_stdout(pie_run(parallel_generation, *args)) for _ in range(2))
    assert first == second
    texts = re.split(r"(?:^|\\n)\[\d+\] ", first)[1:]
    assert len(texts) == N and len(set(texts)) == N, first
