"""Fair share and memory pressure in the serving core (pie_runtime.pressure, quotas in
pie_runtime.pages) on the real engine: allocations wait instead of failing,
victims are preempted to host memory and restored bit for bit, quotas and the
persistent-export cache are enforced, and nothing leaks."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine_jax.batch import Logprobs, Sample
from pie_runtime import PieError, ServingCore
from pie_runtime.limits import TenantLimits
from tests.runtime.conftest import RUNTIME_NUM_PAGES, RUNTIME_PAGE_SIZE

PS = RUNTIME_PAGE_SIZE
VOCAB_PROBE = Logprobs(0, tuple(range(32)))


@pytest.fixture
def make_core(runtime_engine):
    """ServingCores with given limits on the shared engine; each must give back every page."""
    cores: list[ServingCore] = []

    def make(**kwargs) -> ServingCore:
        core = ServingCore(runtime_engine, **kwargs).start()
        cores.append(core)
        return core

    assert runtime_engine.pool.num_free == RUNTIME_NUM_PAGES
    yield make
    for core in cores:
        core.check_invariants()
        core.stop()
    assert runtime_engine.pool.num_free == RUNTIME_NUM_PAGES


def fill(queue, pages, first_token=1):
    """Writes len(pages) * PS tokens into the pages (a prompt), synchronously."""
    n = len(pages) * PS
    tokens = [(first_token + i) % 300 + 1 for i in range(n)]
    queue.forward(tokens, list(range(n)), pages, PS, None, [Sample(n - 1)]).result(60)


def probe(queue, pages, position):
    """Log-probabilities of a one-token forward that attends every slot of `pages`
    (it writes the last slot of the last page): depends on all the K/V they hold."""
    return queue.forward([7], [position], pages, PS, None, [VOCAB_PROBE]).result(60)[0]


def in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


def codes(fn) -> str:
    try:
        fn()
    except PieError as exc:
        return exc.code
    return "ok"


def test_an_allocation_the_pool_cannot_serve_waits_for_pages_instead_of_failing(make_core):
    """Bob asks for more than his share of the pool while the older Alice
    holds hers and more: he ranks below her, so he waits (no one is
    preempted) until she frees pages."""
    core = make_core(idle_victim_ms=60_000)  # no idle preemption: only waiting
    a = core.open_instance("a", namespace="alice")
    qa = a.create_queue(0)
    held = qa.allocate_pages(40)
    b = core.open_instance("b", namespace="bob")
    qb = b.create_queue(0)
    t, box = in_thread(lambda: qb.allocate_pages(33))
    time.sleep(0.3)
    assert t.is_alive() and b.page_count() == 0  # waiting, not failed
    qa.free_pages(held[:10])
    t.join(30)
    assert len(box["value"]) == 33 and b.page_count() == 33
    stats = core.stats
    assert stats.alloc_waits == 1 and stats.alloc_wait_seconds > 0.2 and stats.preemptions == 0
    a.close()
    b.close()


def test_out_of_memory_only_past_a_quota_or_the_pool(make_core):
    """An instance can never hold more than its quota (nor its namespace's,
    nor the pool): such a request fails at once. A namespace's quota bounds
    what it holds in the pool at once: past it, a request of one of its
    instances waits (here: its idle sibling is preempted)."""
    core = make_core(limits=TenantLimits(instance_pages=8, namespace_pages=12), idle_victim_ms=100)
    q1 = core.open_instance("one", namespace="ns").create_queue(0)
    q2 = core.open_instance("two", namespace="ns").create_queue(0)
    assert codes(lambda: q1.allocate_pages(9)) == "out-of-memory"  # instance quota
    q1.allocate_pages(8)
    assert len(q2.allocate_pages(5)) == 5  # 8 + 5 > 12: "one" (idle) goes to host memory
    assert core.suspended_instances() == ["one"] and core.namespace_pages("ns") == 13
    q3 = core.open_instance("three", namespace="other").create_queue(0)
    assert len(q3.allocate_pages(8)) == 8  # another namespace is not affected
    small_ns = make_core(limits=TenantLimits(namespace_pages=6))
    q4 = small_ns.open_instance("four").create_queue(0)
    assert codes(lambda: q4.allocate_pages(7)) == "out-of-memory"  # alone past its namespace's quota
    unbounded = make_core()
    q5 = unbounded.open_instance("five").create_queue(0)
    assert codes(lambda: q5.allocate_pages(RUNTIME_NUM_PAGES + 1)) == "out-of-memory"  # the whole pool
    for name in ("one", "two", "three"):
        core.close_instance(name)
    small_ns.close_instance("four")
    unbounded.close_instance("five")


def test_a_tenant_past_its_share_is_preempted_and_restored_bit_for_bit(make_core):
    """Alice holds 3/4 of the pool; Bob (within his half) needs half of it:
    Alice's pages go to host memory, Bob runs, and when Alice needs her
    pages again they come back exactly as they were."""
    core = make_core(idle_victim_ms=60_000)  # preempted by rank, not by idleness
    alice = core.open_instance("alice-1", namespace="alice")
    qa = alice.create_queue(0)
    mine = qa.allocate_pages(48)
    fill(qa, mine[:6])
    before = probe(qa, mine[:7], 27)
    bob = core.open_instance("bob-1", namespace="bob")
    qb = bob.create_queue(0)
    got = qb.allocate_pages(32)  # 16 free: 16 more come from Alice
    assert len(got) == 32
    assert core.suspended_instances() == ["alice-1"]
    assert core.instance_pages("alice-1")[0] == 48  # still hers, in host memory
    fill(qb, got[:4], first_token=100)
    t, box = in_thread(lambda: probe(qa, mine[:7], 27))  # needs her pages: waits for room
    time.sleep(0.3)
    assert t.is_alive()
    qb.free_pages(got)
    t.join(60)
    np.testing.assert_array_equal(box["value"], before)
    stats = core.stats
    assert stats.preemptions == 1 and stats.pages_preempted >= 16 and stats.restores == 1
    assert stats.paused_seconds >= 0.3
    alice.close()
    bob.close()


def test_an_idle_holder_is_preempted_for_a_waiting_request(make_core):
    """An instance that ranks above a waiting request (older, both past their
    share) but sits idle (a chat waiting for its user) is swapped out after
    `idle_victim_ms` rather than blocking the request."""
    core = make_core(idle_victim_ms=100)
    sleeper = core.open_instance("sleeper", namespace="alice")
    qs = sleeper.create_queue(0)
    held = qs.allocate_pages(60)
    fill(qs, held[:2])
    newcomer = core.open_instance("newcomer", namespace="bob")
    qn = newcomer.create_queue(0)
    assert len(qn.allocate_pages(40)) == 40
    assert core.stats.alloc_waits == 1  # it waited for the sleeper to be idle long enough
    assert core.suspended_instances() == ["sleeper"]
    newcomer.close()
    assert probe(qs, held[:3], 11) is not None  # restored on demand
    assert core.suspended_instances() == []
    sleeper.close()


def test_persistent_exports_are_a_capped_lru_cache_per_namespace(make_core):
    core = make_core(limits=TenantLimits(export_pages=4))
    inst = core.open_instance("exporter", namespace="ns")
    q = inst.create_queue(0)
    for name in ("e1", "e2", "e3"):
        q.export_pages(name, q.allocate_pages(2), PS, True)
        q.synchronize().result(10)
    assert q.list_exports() == ["e2", "e3"]  # e1 evicted: 6 pages > 4
    assert codes(lambda: q.import_pages("e1")) == "not-found"
    ids, _ = q.import_pages("e2")  # used: now the newest
    q.export_pages("e4", q.allocate_pages(2), PS, True)
    q.synchronize().result(10)
    assert q.list_exports() == ["e2", "e4"]
    assert core.stats.exports_evicted == 2
    assert codes(lambda: q.export_pages("big", q.allocate_pages(5), PS, True)) == "out-of-memory"
    inst.close()
    cleanup = core.open_instance("cleanup", namespace="ns").create_queue(0)
    for name in cleanup.list_exports():
        cleanup.unexport(name)
    core.close_instance("cleanup")


def test_the_pool_evicts_ended_instances_persistent_exports_before_preempting(make_core):
    core = make_core(idle_victim_ms=60_000, limits=TenantLimits(export_pages=48))
    exporter = core.open_instance("exporter", namespace="cache")
    q = exporter.create_queue(0)
    q.export_pages("prefix", q.allocate_pages(40), PS, True)
    q.synchronize().result(10)
    exporter.close()
    assert core.namespace_pages("cache") == 40
    runner = core.open_instance("runner", namespace="work")
    idle = core.open_instance("idle", namespace="work")
    idle.create_queue(0).allocate_pages(10)
    assert len(runner.create_queue(0).allocate_pages(30)) == 30
    assert core.namespace_pages("cache") == 0 and core.stats.exports_evicted == 1
    assert core.stats.preemptions == 0
    runner.close()
    idle.close()


def test_copy_on_write_copies_count_against_the_quota(make_core):
    core = make_core(limits=TenantLimits(namespace_pages=6))
    inst = core.open_instance("forker", namespace="ns")
    q = inst.create_queue(0)
    pages = q.allocate_pages(3)
    fill(q, pages)
    q.export_pages("base", pages, PS, False)
    q.synchronize().result(10)
    fork, _ = q.import_pages("base")  # shared: still 3 pages
    assert core.namespace_pages("ns") == 3
    q.allocate_pages(2)
    # Writing the fork's last page copies it: the 6th page of the namespace.
    q.forward([5], [11], fork, PS, None, [Sample(0)]).result(10)
    assert core.namespace_pages("ns") == 6
    # The next copy would be a 7th: the write fails with out-of-memory, alone.
    with pytest.raises(PieError) as exc:
        q.forward([5], [7], fork[:2], PS, None, [Sample(0)]).result(10)
    assert exc.value.code == "out-of-memory" and "quota" in exc.value.message
    inst.close()


def test_limits_come_from_a_mapping_or_keywords_and_bad_ones_are_refused():
    limits = TenantLimits.from_mapping({"instance-pages": 8, "kv_keys": 10})
    assert limits == TenantLimits(instance_pages=8, kv_keys=10)
    bounds = limits.page_bounds(64)
    assert (bounds.instance, bounds.namespace, bounds.exports, bounds.swap) == (8, 64, 16, 64)
    assert TenantLimits(instance_pages=500).page_bounds(64).instance == 64  # never more than the pool
    with pytest.raises(ValueError, match="unknown limit 'pages'"):
        TenantLimits.from_mapping({"pages": 1})
    with pytest.raises(ValueError, match="kv_bytes"):
        TenantLimits(kv_bytes=-1)


# ---------------------------------------------------------------- random handler calls under pressure
CHAOS_KINDS = ["alloc", "alloc", "free", "export", "import", "unexport", "copy", "mask", "forward", "forward",
               "run", "sync", "priority"]
CHAOS_OPS = st.lists(
    st.tuples(
        st.sampled_from(CHAOS_KINDS),
        st.lists(st.integers(0, 13), min_size=1, max_size=3),  # page picks: 12 and 13 are invalid ids
        st.integers(0, 9),  # count / offset / length / export name
        st.booleans(),
    ),
    max_size=25,
)
EXPECTED_CODES = ("invalid-argument", "not-found", "out-of-memory", "already-exists")
GOOD_PROMPT = [200, 150, 100, 50, 25, 12, 6]


def _chaos(core: ServingCore, name: str, namespace: str, ops) -> list:
    """Runs one instance's random calls; returns its futures. Every error must be an expected one."""
    inst = core.open_instance(name, namespace=namespace)
    q = inst.create_queue(0)
    held: list[int] = []
    futures: list = []

    def pick(k: int) -> int:
        return held[k % len(held)] if held and k < 12 else 1000 + k

    for kind, picks, n, flag in ops:
        pages = [pick(k) for k in picks]
        try:
            if kind == "alloc":
                held += q.allocate_pages(n)
            elif kind == "free":
                q.free_pages(pages)
                held = [p for p in held if p not in pages]
            elif kind == "export":
                q.export_pages(f"e{n % 3}", pages, n % PS + 1, flag)
            elif kind == "import":
                held += q.import_pages(f"e{n % 3}")[0]
            elif kind == "unexport":
                q.unexport(f"e{n % 3}")
            elif kind == "copy":
                q.copy_slots(pages[0], n % PS, pages[-1], (n * 3) % PS, n % 3)
            elif kind == "mask":
                q.mask_slots(pages[0], n % PS, 1, flag)
            elif kind == "forward":
                tokens = [7 + n] * (n % 2 + 1)
                futures.append(q.forward(tokens, [0, 1][:len(tokens)], pages, n % PS + 1, None, [Sample(0)]))
            elif kind == "run":
                futures.append(q.forward_run([9 + n], [3], pages, n % PS + 1, [Sample(0)], [Sample(0)] * (n % 3)))
            elif kind == "sync":
                futures.append(q.synchronize())
            elif kind == "priority":
                q.set_priority(n)
        except PieError as exc:
            assert exc.code in EXPECTED_CODES, exc
    return futures


# Two instances of one namespace that together want more than its quota: one must wait.
CONTENDED = [
    [("alloc", [0], 6, False), ("forward", [0, 1], 3, False), ("sync", [0], 0, False)],
    [("alloc", [0], 1, False)],
    [("alloc", [0], 6, False), ("forward", [0], 3, False), ("sync", [0], 0, False)],
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programs=st.lists(CHAOS_OPS, min_size=2, max_size=4))
@example(programs=CONTENDED)
def test_random_handler_calls_under_a_small_pool_never_break_the_server(runtime_engine, good_tokens, programs):
    """Instances of two small namespaces (8 pages each, 6 per instance) make
    random calls, valid and invalid, concurrently, beside a well-behaved
    generation: the server never fails a call with an unexpected code,
    accounting stays exact, the generation equals its solo run, and every
    page comes back."""
    core = ServingCore(runtime_engine, limits=TenantLimits(namespace_pages=8, instance_pages=6),
                       idle_victim_ms=20).start()
    try:
        _random_calls(core, good_tokens, programs)
        if programs == CONTENDED:
            stats = core.stats
            assert stats.alloc_waits >= 1 and stats.preemptions >= 1, stats
    finally:
        core.stop()
    assert runtime_engine.pool.num_free == RUNTIME_NUM_PAGES


def _random_calls(core: ServingCore, good_tokens: list[int], programs) -> None:
    example = next(_EXAMPLES)
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(i: int, ops) -> None:
        try:
            results[f"c{i}"] = _chaos(core, f"chaos-{example}-{i}", f"chaos{i % 2}", ops)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    def good() -> None:
        try:
            inst = core.open_instance(f"good-{example}", namespace="good")
            results["good"] = greedy_tokens(inst.create_queue(0), GOOD_PROMPT, len(good_tokens))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, ops)) for i, ops in enumerate(programs)]
    threads.append(threading.Thread(target=good))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, errors
    assert results["good"] == good_tokens
    for name, futures in results.items():
        for f in futures if name != "good" else ():
            try:
                f.result(60)
            except PieError as exc:
                assert exc.code in EXPECTED_CODES, exc
    core.check_invariants()
    for i in range(len(programs)):
        core.close_instance(f"chaos-{example}-{i}")
    core.close_instance(f"good-{example}")
    for ns in ("chaos0", "chaos1"):
        cleanup = core.open_instance(f"cleanup-{example}-{ns}", namespace=ns).create_queue(0)
        for name in cleanup.list_exports():
            cleanup.unexport(name)
        core.close_instance(f"cleanup-{example}-{ns}")
    assert core.wait_idle(10)
    core.check_invariants()
    assert core.held_pages() == 0 and core._pages.swapped_total() == 0


_EXAMPLES = itertools.count()


def greedy_tokens(queue, prompt, n):
    pages: list[int] = []
    length, step, out = 0, list(prompt), []
    for _ in range(n):
        need = -(-(length + len(step)) // PS) - len(pages)
        if need > 0:
            pages += queue.allocate_pages(need)
        positions = list(range(length, length + len(step)))
        length += len(step)
        (token,) = queue.forward(step, positions, pages, length - (len(pages) - 1) * PS, None,
                                 [Sample(len(step) - 1)]).result(60)
        out.append(token)
        step = [token]
    return out


@pytest.fixture(scope="module")
def good_tokens(runtime_engine):
    core = ServingCore(runtime_engine).start()
    try:
        inst = core.open_instance("solo")
        tokens = greedy_tokens(inst.create_queue(0), GOOD_PROMPT, 10)
        inst.close()
    finally:
        core.stop()
    return tokens

