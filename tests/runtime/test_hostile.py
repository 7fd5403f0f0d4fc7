"""Hostile inferlets (tests/runtime/guests/hostile.py, real components) beside well-behaved ones.

Each test runs an attack on a real host, serving core and engine and checks
what the server knows (pages held, subscribers, instances, threads, file
descriptors), never what a guest says about itself: every attack fails,
every normal instance's output equals its solo run, and afterwards
everything is back to idle.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from pie_runtime.wasm_host import Capabilities, Host, ServedModel
from tests.runtime.guests.fixtures import NUM_PAGES, component_cache, engine_greedy, launch, load_guest

LAUNCH = Capabilities(launch=True)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hostile():
    return load_guest(component_cache(), "hostile")


@pytest.fixture()
def host(engine, core):
    """A fresh host per test (kvstore, broker); the engine and core are the module's."""
    return Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None)


@pytest.fixture(scope="module")
def expected(engine, tiny_llama_model):
    """What a well-behaved generation must produce: the engine's own greedy tokens."""
    return engine_greedy(tiny_llama_model, engine.tokenizer.encode(PROMPT), 8)


def _counts() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def _idle_counts() -> tuple[int, int]:
    """Thread and descriptor counts once they have stopped changing (helper threads wind down)."""
    previous, current = None, _counts()
    while current != previous:
        time.sleep(0.1)
        previous, current = current, _counts()
    return current


@pytest.fixture()
def before(host, probe, hostile, expected):
    """Thread and file-descriptor counts at idle, once both guests have run
    and one has slept in WASI (first uses open caches and wasmtime's I/O
    runtime, which stay open)."""
    assert _ok_json(_normal(host, probe).wait(120))["tokens"] == expected
    assert launch(host, hostile, "sleep", "0.01", "0", namespace="warm-up").wait(60).ok
    return _idle_counts()


def _wait_for_keys(host, prefix, count, namespace="default", timeout=60.0):
    kv = host.kvstore.namespace(namespace)
    deadline = time.monotonic() + timeout
    while len(kv.list_keys(prefix)) < count:
        assert time.monotonic() < deadline, f"only {kv.list_keys(prefix)} under {prefix!r}"
        time.sleep(0.02)


def _assert_back_to_idle(core, before, timeout=30.0):
    """Pool, instances, threads and file descriptors as before the test."""
    assert core.wait_idle(timeout)
    assert core.held_pages() == 0 and core.free_pages() == NUM_PAGES
    core.check_invariants()
    deadline = time.monotonic() + timeout
    while _counts() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counts() == before


def _ok_json(outcome):
    assert outcome.ok, outcome.describe()
    return json.loads(outcome.value)


def _normal(host, probe, namespace="default"):
    return launch(host, probe, "generate", PROMPT, "8", namespace=namespace)


# --------------------------------------------------------------------------- stale KV


def test_fresh_pages_hold_nothing_of_their_previous_owner(host, hostile, probe, core, before):
    """Stealing: a tenant unmasks slots it never wrote and attends them. Its
    log-probabilities are bit-identical before and after another tenant's
    secret prompt went through those very pages (the pool hands out the
    pages freed last first, so 16 pages include the victim's 4)."""
    vocab, pages = "64", "16"
    first = _ok_json(launch(host, hostile, "steal", pages, vocab, namespace="mallory").wait(120))
    victim = launch(host, probe, "generate", "alice's password is swordfish", "4", namespace="alice")
    assert victim.wait(120).ok
    second = _ok_json(launch(host, hostile, "steal", pages, vocab, namespace="mallory").wait(120))
    assert second["logprobs"] == first["logprobs"]  # bit for bit (JSON round-trips floats exactly)
    _assert_back_to_idle(core, before)


# --------------------------------------------------------------------------- terminate


def test_terminate_releases_a_tree_blocked_in_wasi_within_a_second(host, hostile, probe, core, expected, before):
    """A parent and its children, all asleep inside WASI (time.sleep, which
    wasmtime cannot interrupt) while holding pages and subscriptions:
    terminating the parent releases the whole tree within a second, while a
    normal instance keeps generating."""
    parent = launch(host, hostile, "spawn_sleepers", "2", "3", "2", grant=LAUNCH)
    _wait_for_keys(host, "sleeping/", 3)
    normal = _normal(host, probe)
    assert core.held_pages() >= 6 and host.broker.subscriber_count() == 3
    started = time.monotonic()
    parent.terminate("the client gave up")
    assert core.held_pages() <= NUM_PAGES  # the normal instance may hold some
    assert host.broker.subscriber_count() == 0
    outcome = parent.wait(5)
    assert time.monotonic() - started < 1.0
    assert outcome.status == "terminated" and "the client gave up" in outcome.error
    assert all(c.outcome.result(1).status == "terminated" for c in parent.children)
    assert _ok_json(normal.wait(120))["tokens"] == expected
    assert core.wait_idle(5) and core.held_pages() == 0
    _assert_back_to_idle(core, before)  # the sleeping threads end when their sleep does


# --------------------------------------------------------------------------- messaging


def test_broadcast_topics_are_namespaced(host, hostile, probe):
    snoop = launch(host, hostile, "snoop", "news", "1500", namespace="mallory")
    _wait_for_keys(host, "snooping/", 1, namespace="mallory")
    subs = [launch(host, probe, "sub", "news", "2", namespace="alice") for _ in range(2)]
    pub = launch(host, probe, "pub", "news", "2", "2", namespace="alice")
    assert pub.wait(60).ok
    for s in subs:
        assert _ok_json(s.wait(60)) == {"got": ["msg-0", "msg-1"]}
    assert _ok_json(snoop.wait(60)) == {"got": None}
