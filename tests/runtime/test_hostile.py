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

from pie_runtime.errors import PieError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.registry import Host, ServedModel
from pie_runtime.instance import InstanceLimits
from pie_runtime.limits import TenantLimits
from pie_runtime.messaging import ClientChannel
from tests.runtime.guests.fixtures import NUM_PAGES, component_cache, engine_greedy, launch, load_guest

LAUNCH = Capabilities(launch=True)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hostile():
    return load_guest(component_cache(), "hostile")


LIMITS = TenantLimits(kv_bytes=64 << 10, kv_keys=1000, output_bytes=256 << 10, output_line_bytes=4096,
                      max_tree_instances=4, max_instances=32)


@pytest.fixture()
def host(engine, core):
    """A fresh host per test (kvstore, broker) with small limits; the engine and core are the module's."""
    return Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None, limits=LIMITS)


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


def _assert_back_to_idle(core, before, host, timeout=30.0):
    """Pool, instances, threads and file descriptors back to what they were
    before the test (fewer descriptors is fine: the collector may close an
    earlier test's)."""
    assert core.wait_idle(timeout)
    assert core.held_pages() == 0 and core.free_pages() == NUM_PAGES and core.suspended_instances() == []
    core.check_invariants()
    deadline = time.monotonic() + timeout
    while host.live_instances() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.live_instances() == 0

    def leaked() -> bool:
        threads, fds = _counts()
        return threads > before[0] or fds > before[1]

    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked(), (_counts(), before)


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
    _assert_back_to_idle(core, before, host)


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
    _assert_back_to_idle(core, before, host)  # the sleeping threads end when their sleep does


# --------------------------------------------------------------------------- messaging


def test_broadcast_topics_are_namespaced(host, hostile, probe, core, before):
    snoop = launch(host, hostile, "snoop", "news", "1500", namespace="mallory")
    _wait_for_keys(host, "snooping/", 1, namespace="mallory")
    subs = [launch(host, probe, "sub", "news", "2", namespace="alice") for _ in range(2)]
    pub = launch(host, probe, "pub", "news", "2", "2", namespace="alice")
    assert pub.wait(60).ok
    for s in subs:
        assert _ok_json(s.wait(60)) == {"got": ["msg-0", "msg-1"]}
    assert _ok_json(snoop.wait(60)) == {"got": None}
    _assert_back_to_idle(core, before, host)


# --------------------------------------------------------------------------- fair share


@pytest.mark.parametrize("how", ["hold", "pin"])
def test_a_tenant_taking_the_whole_pool_cannot_make_a_cotenant_fail(host, hostile, probe, core, expected,
                                                                    before, how):
    """Mallory takes every page of the pool and sits on them (pinned: each
    also held by an export and a second id); Alice's and Bob's generations
    still finish with their solo output: Mallory, past her share, is
    preempted (her pages go to host memory), not Alice or Bob."""
    preempted = core.stats.preemptions
    client = ClientChannel()
    hog = launch(host, hostile, "allocate", str(NUM_PAGES), how, namespace="mallory", client=client)
    _wait_for_keys(host, "holding/", 1, namespace="mallory")
    assert core.held_pages() == NUM_PAGES
    normal = [_normal(host, probe, namespace=ns) for ns in ("alice", "bob", "alice")]
    for inst in normal:
        assert _ok_json(inst.wait(120))["tokens"] == expected
    assert core.stats.preemptions > preempted
    client.deliver("done")
    assert _ok_json(hog.wait(60)) == {"code": "ok"}  # the hog itself lost nothing either
    _assert_back_to_idle(core, before, host)


def test_persistent_export_spam_cannot_pin_the_pool(host, hostile, probe, core, expected, before):
    """Twelve short instances each export 8 pages persistently (96 pages, a
    pool of 64): the namespace's exports stay within their cap (a quarter of
    the pool, least recently used evicted) and later instances run."""
    for i in range(12):
        assert launch(host, hostile, "export_spam", f"spam-{i}", "8", namespace="mallory").wait(120).ok
    assert core.namespace_pages("mallory") <= NUM_PAGES // 4
    assert _ok_json(_normal(host, probe, namespace="alice").wait(120))["tokens"] == expected
    assert _ok_json(launch(host, hostile, "allocate", str(NUM_PAGES)).wait(60)) == {"code": "ok"}
    assert core.namespace_pages("mallory") == 0  # the whole pool was wanted: the cache went
    _assert_back_to_idle(core, before, host)


# --------------------------------------------------------------------------- bounds


def test_the_key_value_store_is_bounded_per_namespace(host, hostile, probe, before, core):
    flood = launch(host, hostile, "kv_flood", "1000", namespace="mallory").wait(60)
    if flood.ok:  # contract 0.2: `set` returns the error
        refused = json.loads(flood.value)
        assert refused["code"] == "out-of-memory" and "kv_bytes" in refused["message"]
    else:  # contract 0.1: `set` has no result, so the error traps the instance
        assert flood.status == "trap" and "out-of-memory" in flood.error and "kv_bytes" in flood.error
    used, keys = host.kvstore.namespace_usage("mallory")
    assert used <= LIMITS.kv_bytes and keys > 0
    assert run_kv(host, probe, "alice") == {"value": "hi", "keys": ["greeting"], "deleted_missing": False}
    _assert_back_to_idle(core, before, host)


def run_kv(host, probe, namespace):
    assert launch(host, probe, "kv", "write", "greeting", "hi", namespace=namespace).wait(60).ok
    return _ok_json(launch(host, probe, "kv", "read", "greeting", namespace=namespace).wait(60))


def test_launch_trees_and_the_server_bound_instances_and_memory(host, hostile, probe, core, before):
    small = InstanceLimits(memory_bytes=128 << 20)
    bomb = _ok_json(launch(host, hostile, "spawn", "10", "0.2", grant=LAUNCH, limits=small).wait(60))
    assert bomb["started"] == LIMITS.max_tree_instances - 1
    assert bomb["refused"]["code"] == "out-of-memory" and "max_tree_instances" in bomb["refused"]["message"]
    big = InstanceLimits(memory_bytes=1536 << 20)  # three of these pass the tree's 4 GiB
    bomb = _ok_json(launch(host, hostile, "spawn", "10", "0.2", grant=LAUNCH, limits=big).wait(60))
    assert bomb["started"] == 2 and "tree_memory_bytes" in bomb["refused"]["message"]
    assert _ok_json(launch(host, hostile, "spawn", "1", "0", limits=small).wait(60))["refused"]["code"] == \
        "unsupported"  # launch needs the operator's grant
    server = Host([ServedModel("tiny", core.engine, core)], guest_output=lambda *a: None,
                  limits=TenantLimits(max_instances=2))
    clients = [ClientChannel() for _ in range(2)]
    parked = [launch(server, probe, "block", client=c) for c in clients]
    with pytest.raises(PieError) as exc:
        launch(server, probe, "runtime")
    assert exc.value.code == "out-of-memory" and "max_instances" in exc.value.message
    for c, inst in zip(clients, parked):
        c.deliver("bye")
        assert inst.wait(60).ok
    assert server.live_instances() == 0 and host.live_instances() == 0
    _assert_back_to_idle(core, before, host)


def test_guest_output_is_bounded(engine, core, hostile):
    lines: list[str] = []
    host = Host([ServedModel("tiny", engine, core)], limits=LIMITS,
                guest_output=lambda _id, _stream, text: lines.append(text))
    out = launch(host, hostile, "flood_output", "40000", "400").wait(120)
    assert out.ok, out.describe()
    assert lines[0] == "y" * LIMITS.output_line_bytes  # the long line, cut
    assert max(len(line) for line in lines) <= LIMITS.output_line_bytes + 200
    assert sum(len(line) + 1 for line in lines[:-1]) <= LIMITS.output_bytes
    assert lines[-1].startswith("[output limit of") and len(lines) < 400


def test_filesystem_grants_are_read_only_unless_write_is_granted(host, hostile, tmp_path, core, before):
    (tmp_path / "existing.txt").write_text("public data")
    directory = str(tmp_path)
    read_only = _ok_json(launch(host, hostile, "files", directory, grant=Capabilities(fs=(directory,))).wait(60))
    assert read_only["read"] == "public data" and read_only["write"].startswith("error")
    assert not (tmp_path / "written.txt").exists()
    assert read_only["root"].startswith("error")  # nothing outside the grant
    read_write = _ok_json(launch(host, hostile, "files", directory, grant=Capabilities(fs_rw=(directory,))).wait(60))
    assert read_write["write"] == "ok" and (tmp_path / "written.txt").read_text() == "tenant was here"
    nothing = _ok_json(launch(host, hostile, "files", directory).wait(60))
    assert nothing["read"].startswith("error") and nothing["write"].startswith("error")
    _assert_back_to_idle(core, before, host)
