"""messaging.py: every client message gets its reply, in order, until the client closes."""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.slow

LINES = ["hello", "a longer message with several words", "x y z"]


def test_each_message_is_echoed_with_its_token_count(samples, pie_run, oracle):
    run = pie_run(samples["messaging"], "--upper", stdin="\n".join(LINES) + "\n")
    assert run.result == f"{len(LINES)} messages"
    replies = run.sent_json()
    assert [r["n"] for r in replies] == [1, 2, 3]
    assert [r["echo"] for r in replies] == [line.upper() for line in LINES]
    assert [r["tokens"] for r in replies] == [len(oracle.encode(line)) for line in LINES]
