"""agent_swarm.py: instances of one run exchange their contributions over broadcast/subscribe."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

AGENTS = 3


def test_every_agent_hears_every_other(samples, pie_run):
    run = pie_run(samples["agent_swarm"], "--agents", AGENTS, "--max-tokens", 4, "--timeout", 60,
                  options=("--instances", AGENTS))
    lines = run.messages + [run.result]
    assert sorted(line[:4] for line in lines) == [f"[{k}] " for k in range(AGENTS)]
    agents = [json.loads(line[4:]) for line in lines]
    contributions = {a["id"]: a["contribution"] for a in agents}
    assert len(contributions) == AGENTS  # distinct instances
    for agent in agents:
        # Exactly the others' posts, as they wrote them (not its own, none missing).
        assert agent["peers"] == {i: c for i, c in contributions.items() if i != agent["id"]}
        assert agent["summary"]
    # The contributions depend on the agent (its name is in its prompt).
    assert len(set(contributions.values())) > 1
