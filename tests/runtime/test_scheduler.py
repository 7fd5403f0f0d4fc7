"""Batching policies and the engine thread's ordering rules.

The policy tests are pure. The ordering tests drive the real Scheduler and
ServingCore with a small recording engine: it lets a test hold a step open and
see exactly which requests were batched and in what order commands ran. What
the real model computes is covered end to end in test_serving.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from engine_jax.batch import EngineInputError, Sample
from engine_jax.kv_cache import PagePool
from pie_runtime import PieError, ServingCore
from pie_runtime.policies import BatchPolicy, Pacing, Ready

PAGE_SIZE = 4


def ready(qid: int, inst: str = "i", priority: int = 0, tokens: int = 1, since: float = 0.0) -> Ready:
    return Ready(qid, inst, priority, tokens, since)


# ---------------------------------------------------------------- policies
def test_greedy_fires_everything_ready_at_once():
    p = BatchPolicy("greedy")
    r = [ready(i, inst=str(i)) for i in range(5)]
    assert p.wait_time([], 0.0, Pacing()) is None
    assert p.wait_time(r, 0.0, Pacing(awaited=100)) == 0.0
    assert len(p.select(r)) == 5


def test_adaptive_waits_for_the_last_steps_cohort_at_most_one_step():
    p = BatchPolicy("adaptive", adaptive_max_wait_s=1.0)
    r = [ready(0, since=10.0), ready(1, since=10.0)]
    # Cold start: no step has run, fire.
    assert p.wait_time(r, 10.0, Pacing(awaited=3)) == 0.0
    # Two of the last step's queues have not resubmitted: wait up to one step's latency
    # counted from when the engine became idle.
    pacing = Pacing(awaited=2, last_step_end=10.05, last_step_latency=0.1)
    assert p.wait_time(r, 10.06, pacing) == pytest.approx(0.09)
    assert p.wait_time(r, 10.2, pacing) == 0.0
    # The whole cohort is back: fire at once.
    assert p.wait_time(r, 10.06, Pacing(awaited=0, last_step_end=10.05, last_step_latency=0.1)) == 0.0
    # A slow step (a compilation) does not make the wait long.
    capped = BatchPolicy("adaptive", adaptive_max_wait_s=0.02)
    assert capped.wait_time(r, 10.06, Pacing(awaited=2, last_step_end=10.05, last_step_latency=5.0)) == pytest.approx(0.01)
    # A batch that is already full does not wait.
    full = BatchPolicy("adaptive", max_batch=2)
    assert full.wait_time(r, 10.06, pacing) == 0.0
    assert len(p.select(r)) == 2


def test_eager_takes_one_request_per_step():
    p = BatchPolicy("eager")
    r = [ready(0, since=2.0), ready(1, since=1.0)]
    assert p.wait_time(r, 0.0, Pacing(open_instances=2)) == 0.0
    assert [x.queue_id for x in p.select(r)] == [1]  # the oldest


def test_fixed_size_waits_for_a_full_batch_or_for_every_instance():
    p = BatchPolicy("fixed-size", fixed_batch_size=3, fixed_max_wait_s=0.5)
    two = [ready(0, "a", since=10.0), ready(1, "b", since=10.1)]
    assert p.wait_time(two, 10.2, Pacing(open_instances=5)) == pytest.approx(0.3)
    assert p.wait_time(two, 11.0, Pacing(open_instances=5)) == 0.0  # a straggler is not stuck forever
    assert p.wait_time(two, 10.2, Pacing(open_instances=2)) == 0.0  # no one else can add work
    four = two + [ready(2, "c"), ready(3, "d")]
    assert p.wait_time(four, 10.2, Pacing(open_instances=9)) == 0.0
    assert len(p.select(four)) == 3


def test_fixed_timeout_waits_from_the_oldest_ready_forward():
    p = BatchPolicy("fixed-timeout", fixed_timeout_s=0.02)
    r = [ready(0, since=5.0), ready(1, since=5.015)]
    assert p.wait_time(r, 5.01, Pacing()) == pytest.approx(0.01)
    assert p.wait_time(r, 5.03, Pacing()) == 0.0
    assert len(p.select(r)) == 2


def test_token_budget_prefers_higher_priority_lets_small_requests_fill_in_and_chunks_the_rest():
    p = BatchPolicy("adaptive", token_budget=10)
    r = [
        ready(0, priority=0, tokens=4, since=0.0),
        ready(1, priority=5, tokens=8, since=1.0),
        ready(2, priority=1, tokens=6, since=2.0),
        ready(3, priority=0, tokens=2, since=3.0),
    ]
    # priority 5 (8 tokens) first; 6 and 4 do not fit; 2 does.
    assert [x.queue_id for x in p.select(r)] == [1, 3]
    # A request larger than the whole budget runs a chunk of it, alone.
    assert p.select([ready(7, tokens=50)]) == [ready(7, tokens=10)]
    # What requests that fit whole leave goes to the first one that does not (a chunk).
    assert p.select([ready(7, tokens=50), ready(8, tokens=1, since=1.0)]) == [ready(8, tokens=1, since=1.0),
                                                                              ready(7, tokens=9)]


def test_adaptive_under_a_budget_waits_for_decoders_before_a_chunk():
    p = BatchPolicy("adaptive", token_budget=8, adaptive_max_wait_s=1.0)
    pacing = Pacing(awaited=2, last_step_end=10.0, last_step_latency=0.1)
    # A long prompt alone more than fills the budget, but decoders coming back would share the step.
    assert p.wait_time([ready(0, tokens=100, since=9.0)], 10.01, pacing) == pytest.approx(0.09)
    # Forwards that fit whole and fill the budget: waiting cannot change the batch.
    assert p.wait_time([ready(i, tokens=4) for i in range(2)], 10.01, pacing) == 0.0
    # So a returning cohort member wakes the engine thread only if it fills the budget alone.
    assert not p.cohort_member_may_fire(1) and p.cohort_member_may_fire(8)
    assert not BatchPolicy("adaptive").cohort_member_may_fire(10**6)
    assert BatchPolicy("greedy").cohort_member_may_fire(1)


def test_max_batch_caps_requests():
    p = BatchPolicy("adaptive", max_batch=2)
    assert len(p.select([ready(i) for i in range(5)])) == 2


def test_bad_policy_arguments_are_rejected():
    for kwargs in [dict(name="bogus"), dict(token_budget=0), dict(max_batch=0), dict(fixed_batch_size=0)]:
        with pytest.raises(ValueError):
            BatchPolicy(**kwargs)


# ---------------------------------------------------------------- the engine thread
class RecordingEngine:
    """Records every engine call in order; a step can be held open by the test.
    Each output returns the token at its index + 1000 so results are traceable."""

    def __init__(self, num_pages: int = 32) -> None:
        self.page_size = PAGE_SIZE
        self.pool = PagePool(num_pages)
        self.log: list[tuple] = []
        self.batches: list[list[tuple[int, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.fail_next_step: Exception | None = None
        self.step_seconds = 0.0  # how long each step takes (its latency, which the adaptive policy paces by)

    def validate(self, req, check_pages: bool = True) -> None:
        if -1 in req.tokens:
            raise EngineInputError("token -1 is outside the vocabulary")

    def validate_output(self, out, i: int, n: int) -> None:
        if out.temperature < 0:
            raise EngineInputError(f"outputs[{i}].temperature={out.temperature} must be >= 0")

    def step(self, requests, validated: bool = False):
        self.in_step.set()
        self.gate.wait(10)
        time.sleep(self.step_seconds)
        self.in_step.clear()
        if self.fail_next_step is not None:
            exc, self.fail_next_step = self.fail_next_step, None
            raise exc
        if any(666 in r.tokens for r in requests):  # passes validate, fails in the step
            raise EngineInputError("token 666 cannot run")
        self.batches.append([tuple(r.tokens) for r in requests])
        for r in requests:
            self.log.append(("forward", tuple(r.tokens), tuple(r.pages)))
        return [[r.tokens[o.index] + 1000 for o in r.outputs] for r in requests]

    def copy_slots(self, *args) -> None:
        self.log.append(("copy_slots", *args))

    def copy_page(self, src: int, dst: int) -> None:
        self.log.append(("copy_page", src, dst))

    def set_valid(self, *args) -> None:
        self.log.append(("set_valid", *args))


@pytest.fixture
def fake():
    engine = RecordingEngine()
    core = ServingCore(engine).start()
    yield engine, core
    core.stop()


def fwd(queue, token: int, pages, last_page_len: int = 1):
    return queue.forward([token], [0], pages, last_page_len, None, [Sample(0)])


def test_commands_on_one_queue_take_effect_in_order(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(2)
    engine.gate.clear()  # hold the first step open so everything below queues up
    f1 = fwd(q, 1, p[:1])
    assert engine.in_step.wait(5)
    q.copy_slots(p[0], 0, p[1], 0, 1)
    f2 = fwd(q, 2, p, 1)
    q.mask_slots(p[1], 0, 1, True)
    f3 = fwd(q, 3, p, 2)
    sync = q.synchronize()
    time.sleep(0.05)
    assert not sync.done()  # the first forward is still in flight
    engine.gate.set()
    assert sync.result(5) is None
    assert [f.result(5) for f in (f1, f2, f3)] == [[1001], [1002], [1003]]
    kinds = [entry[0] for entry in engine.log]
    assert kinds == ["forward", "copy_slots", "forward", "set_valid", "forward"]
    assert [len(b) for b in engine.batches] == [1, 1, 1]  # one forward per queue per step


def test_forwards_of_different_queues_are_batched_together(fake):
    engine, core = fake
    inst = core.open_instance("a")
    queues = [inst.create_queue(0) for _ in range(4)]
    pages = [q.allocate_pages(1) for q in queues]
    engine.gate.clear()
    blocker = fwd(queues[0], 0, pages[0])
    assert engine.in_step.wait(5)
    futures = [fwd(q, 10 + i, pg) for i, (q, pg) in enumerate(zip(queues[1:], pages[1:]), start=1)]
    time.sleep(0.05)
    engine.gate.set()
    blocker.result(5)
    assert [f.result(5) for f in futures] == [[1011], [1012], [1013]]
    assert sorted(engine.batches[1]) == [(11,), (12,), (13,)]
    assert core.stats.max_batch_requests == 3


def test_a_slow_queue_never_blocks_another(fake):
    engine, core = fake
    a = core.open_instance("a").create_queue(0)
    b = core.open_instance("b").create_queue(0)
    pa, pb = a.allocate_pages(1), b.allocate_pages(1)
    # a has a long chain queued; b's single forward is served in the first step that follows.
    engine.gate.clear()
    first = fwd(a, 1, pa)
    assert engine.in_step.wait(5)
    chain = [fwd(a, 2 + i, pa) for i in range(5)]
    fb = fwd(b, 50, pb)
    engine.gate.set()
    assert fb.result(5) == [1050]
    first.result(5)
    [f.result(5) for f in chain]
    assert (50,) in engine.batches[1]


def test_bad_request_fails_alone_and_engine_errors_fail_only_their_batch(fake):
    engine, core = fake
    q1 = core.open_instance("a").create_queue(0)
    q2 = core.open_instance("b").create_queue(0)
    p1, p2 = q1.allocate_pages(1), q2.allocate_pages(1)
    with pytest.raises(PieError) as exc:
        fwd(q1, -1, p1)  # rejected synchronously by engine.validate
    assert exc.value.code == "invalid-argument"

    engine.fail_next_step = RuntimeError("device fell over")
    f = fwd(q1, 5, p1)
    with pytest.raises(PieError) as exc:
        f.result(5)
    assert exc.value.code == "internal" and "device fell over" in exc.value.message
    # The loop keeps serving.
    assert fwd(q2, 6, p2).result(5) == [1006]
    assert fwd(q1, 7, p1).result(5) == [1007]


def test_deferred_error_of_a_plain_command_is_reported_by_the_next_future(fake):
    engine, core = fake
    a = core.open_instance("a", page_quota=None)
    q = a.create_queue(0)
    (page,) = q.allocate_pages(1)
    # Fill the pool, share the page, then make a copy-on-write impossible.
    q.export_pages("x", [page], 1, persistent=False)
    q.synchronize().result(5)
    q.import_pages("x")
    q.allocate_pages(engine.pool.num_free)
    q.mask_slots(page, 0, 1, True)  # needs a CoW page the pool does not have
    with pytest.raises(PieError) as exc:
        q.synchronize().result(5)
    assert exc.value.code == "out-of-memory"
    assert q.synchronize().result(5) is None  # reported once


def test_close_cancels_pending_commands_and_keeps_serving_others(fake):
    engine, core = fake
    a = core.open_instance("a")
    qa = a.create_queue(0)
    qb = core.open_instance("b").create_queue(0)
    pa, pb = qa.allocate_pages(3), qb.allocate_pages(1)
    free_before_close = engine.pool.num_free
    engine.gate.clear()
    inflight = fwd(qa, 1, pa[:1])
    assert engine.in_step.wait(5)
    pending = [fwd(qa, 2, pa[:1]), qa.synchronize()]
    core.close_instance("a")
    for f in [inflight, *pending]:
        with pytest.raises(PieError) as exc:
            f.result(5)
        assert exc.value.code == "closed"
    with pytest.raises(PieError) as exc:
        qa.allocate_pages(1)
    assert exc.value.code == "closed"
    engine.gate.set()
    assert fwd(qb, 9, pb).result(5) == [1009]
    assert core.wait_idle(5)
    assert engine.pool.num_free == free_before_close + 3
    # The cancelled forward never ran.
    assert (2,) not in [t for batch in engine.batches for t in batch]


def test_pages_released_mid_step_reach_a_new_owner_only_after_the_step(fake):
    """A page released while a step may still write it (its holder closed
    mid-step) goes back to the pool only once the step has ended: an
    allocation that needs it waits for the step instead of taking it."""
    engine, core = fake
    qa = core.open_instance("a").create_queue(0)
    qb = core.open_instance("b").create_queue(0)
    all_pages = qa.allocate_pages(engine.pool.num_free)
    engine.gate.clear()
    fwd(qa, 1, all_pages[:1])
    assert engine.in_step.wait(5)
    core.close_instance("a")  # its pages are released mid-step
    assert engine.pool.num_free == 0  # ... but not returned to the pool yet
    got: list[int] = []
    taker = threading.Thread(target=lambda: got.extend(qb.allocate_pages(1)))
    taker.start()
    time.sleep(0.2)
    assert not got and engine.in_step.is_set()  # it waits for the step in flight
    engine.gate.set()
    taker.join(5)
    assert len(got) == 1
    assert core._pages.physical("b", got[0]) in engine.pool.take_fresh()  # cleared before its next use


def test_a_request_the_engine_rejects_at_step_time_fails_alone(fake):
    engine, core = fake
    queues = [core.open_instance(f"i{i}").create_queue(0) for i in range(3)]
    pages = [q.allocate_pages(1) for q in queues]
    engine.gate.clear()
    blocker = fwd(queues[0], 1, pages[0])
    assert engine.in_step.wait(5)
    bad = fwd(queues[1], 666, pages[1])
    good = fwd(queues[2], 7, pages[2])
    time.sleep(0.05)
    engine.gate.set()
    blocker.result(5)
    assert good.result(5) == [1007]
    with pytest.raises(PieError) as exc:
        bad.result(5)
    assert exc.value.code == "invalid-argument" and "666" in exc.value.message


def test_priority_decides_who_runs_first_under_the_token_budget():
    engine = RecordingEngine()
    with ServingCore(engine, token_budget=2) as core:
        inst = core.open_instance("a")
        low, high, blocker_q = inst.create_queue(1), inst.create_queue(9), inst.create_queue(0)
        pl, ph, pb = low.allocate_pages(1), high.allocate_pages(1), blocker_q.allocate_pages(1)
        engine.gate.clear()
        blocker = fwd(blocker_q, 1, pb)
        assert engine.in_step.wait(5)
        f_low = low.forward([10, 11], [0, 1], pl, 2, None, [Sample(1)])
        f_high = high.forward([20, 21], [0, 1], ph, 2, None, [Sample(1)])
        engine.gate.set()
        blocker.result(5), f_low.result(5), f_high.result(5)
        assert engine.batches[1:] == [[(20, 21)], [(10, 11)]]


def test_closed_queue_runs_what_it_holds_and_refuses_more(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(2)
    engine.gate.clear()
    f = fwd(q, 1, p[:1])
    assert engine.in_step.wait(5)
    q.free_pages(p)
    q.close()
    with pytest.raises(PieError) as exc:
        q.synchronize()
    assert exc.value.code == "closed"
    engine.gate.set()
    assert f.result(5) == [1001]
    assert core.wait_idle(5)
    assert engine.pool.num_free == engine.pool.num_pages  # the queued free ran


def test_done_callbacks_may_call_back_into_the_core(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(1)
    chained: list[Future] = []
    f = fwd(q, 1, p)
    f.add_done_callback(lambda _: chained.append(fwd(q, 2, p)))
    f.result(5)
    deadline = time.monotonic() + 5
    while not chained and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chained and chained[0].result(5) == [1002]


def _run_cohort_step(engine, core, queues, pages, hold_s: float) -> None:
    """One engine step holding a forward of every queue, kept open `hold_s` (its latency)."""
    engine.gate.clear()
    futures = [fwd(q, 1, pg) for q, pg in zip(queues, pages)]
    assert engine.in_step.wait(5)
    time.sleep(0.05)  # anything not in the first step joins the next one
    engine.gate.set()
    for f in futures:
        f.result(5)
    # The cohort step: all queues together, open for hold_s.
    engine.gate.clear()
    futures = [fwd(q, 2, pg) for q, pg in zip(queues, pages)]
    assert engine.in_step.wait(5)
    time.sleep(hold_s)
    engine.gate.set()
    for f in futures:
        f.result(5)
    assert sorted(engine.batches[-1]) == [(2,)] * len(queues)


@pytest.mark.parametrize("straggler", ["silent", "closes"])
def test_adaptive_cohort_waits_for_a_straggler_at_most_one_step_and_not_for_a_closed_queue(straggler):
    """The engine thread is not woken by every cohort member's forward (see
    Scheduler.pushed), yet a member that never comes back delays the others by
    about one step, and one whose queue closes does not delay them at all."""
    engine = RecordingEngine()
    core = ServingCore(engine, adaptive_max_wait_ms=60_000).start()
    try:
        inst = core.open_instance("a")
        queues = [inst.create_queue(0) for _ in range(3)]
        pages = [q.allocate_pages(1) for q in queues]
        hold = 1.5
        _run_cohort_step(engine, core, queues, pages, hold)
        started = time.monotonic()
        back = []
        for q, pg in zip(queues[:2], pages[:2]):
            back.append(fwd(q, 3, pg))
            time.sleep(0.05)  # the engine thread settles into its wait between arrivals
        if straggler == "closes":
            queues[2].close()
        assert [f.result(10) for f in back] == [[1003], [1003]]
        waited = time.monotonic() - started
        assert sorted(engine.batches[-1]) == [(3,), (3,)]
        if straggler == "closes":
            assert waited < hold / 2, f"waited {waited:.2f}s for a closed queue"
        else:
            assert waited >= hold / 2, f"fired after {waited:.2f}s without waiting for the cohort"
    finally:
        core.stop()


def test_forward_next_is_fed_the_token_the_previous_forward_drew(fake):
    """forward-next (feeds_previous): queued before the previous pass ran, it
    runs with that pass's last sampled token in place of its placeholder."""
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(1)
    engine.gate.clear()  # both are queued before the first one runs
    first = q.forward([5], [0], p, 1, None, [Sample(0)])
    second = q.forward([0], [1], p, 2, None, [Sample(0)], feeds_previous=True)
    third = q.forward([0], [2], p, 3, None, [Sample(0)], feeds_previous=True)
    engine.gate.set()
    assert first.result(5) == [1005]
    assert second.result(5) == [2005]  # ran on token 1005
    assert third.result(5) == [3005]
    assert [b for b in engine.batches] == [[(5,)], [(1005,)], [(2005,)]]


def test_forward_next_fails_when_the_previous_forward_drew_nothing(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(1)
    with pytest.raises(PieError, match="feed-previous"):
        q.forward([0], [0], p, 1, None, [Sample(0)], feeds_previous=True).result(5)  # nothing before it
    q.forward([5], [0], p, 1, None, []).result(5)  # draws nothing
    with pytest.raises(PieError, match="feed-previous"):
        q.forward([0], [1], p, 2, None, [Sample(0)], feeds_previous=True).result(5)
    bad = q.forward([666], [1], p, 2, None, [Sample(0)])  # passes validation, fails in the step
    with pytest.raises(PieError):
        bad.result(5)
    with pytest.raises(PieError, match="feed-previous"):
        q.forward([0], [1], p, 2, None, [Sample(0)], feeds_previous=True).result(5)
    assert core.stats.forwards_failed == 4


def test_forward_run_chains_passes_each_fed_the_token_the_one_before_drew(fake):
    """A decode run: the first pass, then one single-token pass per draw at
    the next slot and position, each on the pages its slots need; one
    future with every token."""
    engine, core = fake
    inst = core.open_instance("a")
    q = inst.create_queue(0)
    other = inst.create_queue(0)
    p = q.allocate_pages(2)  # 2 prompt tokens + 3 more slots = 5 slots: crosses the page boundary
    po = other.allocate_pages(1)
    engine.gate.clear()
    run = q.forward_run([7, 8], [0, 1], p, 1, [Sample(1)], [Sample(0), Sample(0), Sample(0)])
    alone = fwd(other, 50, po)  # another queue's forward joins the run's first step
    engine.gate.set()
    assert run.result(5) == [1008, 2008, 3008, 4008]
    alone.result(5)
    assert sorted(engine.batches[0]) == [(7, 8), (50,)]
    assert engine.batches[1:] == [[(1008,)], [(2008,)], [(3008,)]]
    passes = [entry for entry in engine.log if entry[1] != (50,)]
    # Slots 0-1 and 2 on the first page, then 3 (the page is full), then 4 on the second.
    assert [len(pages) for _, _, pages in passes] == [1, 1, 1, 2]


def test_a_run_queued_ahead_starts_from_the_last_token_of_the_run_before(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(2)
    engine.gate.clear()  # both runs are queued before the first one runs
    first = q.forward_run([7], [0], p, 2, [Sample(0)], [Sample(0)])
    ahead = q.forward_run([0], [2], p, 4, [Sample(0)], [Sample(0)], feeds_previous=True)
    engine.gate.set()
    assert first.result(5) == [1007, 2007]
    assert ahead.result(5) == [3007, 4007]  # its first pass ran on 2007
    assert engine.batches == [[(7,)], [(1007,)], [(2007,)], [(3007,)]]


def test_forward_run_checks_its_shape_at_once_and_a_failed_pass_fails_the_run(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    p = q.allocate_pages(1)
    with pytest.raises(PieError, match="sample output"):
        q.forward_run([7], [0], p, 2, [], [Sample(0)])
    with pytest.raises(PieError, match="index"):
        q.forward_run([7], [0], p, 2, [Sample(0)], [Sample(1)])
    with pytest.raises(PieError, match="too few"):
        q.forward_run([7, 8], [0, 1], p, 2, [Sample(1)], [Sample(0)])  # 2 slots for 3
    with pytest.raises(PieError, match="positions"):
        q.forward_run([7, 8], [0], p, 3, [Sample(1)], [Sample(0)])
    with pytest.raises(PieError, match="vocabulary"):
        q.forward_run([-1], [0], p, 2, [Sample(0)], [Sample(0)])
    with pytest.raises(PieError, match=r"draws\[0\].temperature"):  # a draw between the first and last pass
        q.forward_run([7], [0], p, 3, [Sample(0)], [Sample(0, temperature=-1.0), Sample(0)])
    assert engine.batches == []  # nothing was queued
    run = q.forward_run([666], [0], p, 3, [Sample(0)], [Sample(0), Sample(0)])  # fails in the step
    with pytest.raises(PieError, match="666"):
        run.result(5)
    assert q.forward_run([9], [0], p, 2, [Sample(0)], [Sample(0)]).result(5) == [1009, 2009]
