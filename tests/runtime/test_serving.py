"""The serving core end to end on the real Engine (tiny random Llama, page size 4):
ordering, batching, copy-on-write, faults and page accounting."""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_jax.batch import Distribution, Logprobs, Sample
from pie_runtime import PieError, Queue, ServingCore

PROMPTS = [
    [5, 17, 42, 99, 7, 3],
    [11, 12, 13],
    [200, 150, 100, 50, 25, 12, 6, 3, 1],
    [77],
    [300, 301, 302, 303, 304],
    [9, 8, 7, 6, 5, 4, 3, 2],
]


class Seq:
    """One sequence driven through a queue: pages grow as tokens are appended."""

    def __init__(self, queue: Queue, page_size: int, pages: list[int] | None = None, length: int = 0) -> None:
        self.queue = queue
        self.page_size = page_size
        self.pages = list(pages or [])
        self.length = length

    def forward(self, tokens: Sequence[int], outputs: Sequence, mask: np.ndarray | None = None) -> Future:
        need = math.ceil((self.length + len(tokens)) / self.page_size) - len(self.pages)
        if need > 0:
            self.pages += self.queue.allocate_pages(need)
        positions = list(range(self.length, self.length + len(tokens)))
        self.length += len(tokens)
        last = self.length - (len(self.pages) - 1) * self.page_size
        return self.queue.forward(tokens, positions, self.pages, last, mask, outputs)


def greedy(core: ServingCore, queue: Queue, prompt: Sequence[int], max_new: int) -> list[int]:
    seq = Seq(queue, core.page_size)
    new, out = list(prompt), []
    for _ in range(max_new):
        (token,) = seq.forward(new, [Sample(len(new) - 1)]).result(60)
        out.append(token)
        new = [token]
    queue.free_pages(seq.pages)
    return out


def in_threads(fns: list[Callable[[], object]]) -> list[object]:
    """Runs each function in its own thread; re-raises the first failure."""
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def assert_same_outputs(got: list, want: list) -> None:
    """Tokens must match exactly; probabilities to float tolerance (batch shapes differ)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, tuple):  # distribution
            assert g[0] == w[0]
            np.testing.assert_allclose(g[1], w[1], rtol=1e-4, atol=1e-6)
        elif isinstance(w, list):  # logprobs
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
        else:
            assert g == w


# ---------------------------------------------------------------- batching
def test_concurrent_sequences_match_solo_runs_and_are_batched(serving_core):
    core = serving_core
    solo = []
    for i, prompt in enumerate(PROMPTS):
        inst = core.open_instance(f"solo-{i}")
        solo.append(greedy(core, inst.create_queue(0), prompt, 6))
        inst.close()
    assert core.stats.max_batch_requests == 1

    def job(i: int) -> Callable[[], list[int]]:
        def run() -> list[int]:
            inst = core.open_instance(f"conc-{i}")
            try:
                return greedy(core, inst.create_queue(0), PROMPTS[i], 6)
            finally:
                inst.close()

        return run

    concurrent = in_threads([job(i) for i in range(len(PROMPTS))])
    assert concurrent == solo
    stats = core.stats
    assert stats.max_batch_requests > 1, stats.batch_requests
    assert stats.tokens_generated == 2 * 6 * len(PROMPTS)


# ---------------------------------------------------------------- ordering
def chain(core: ServingCore, queue: Queue, prompt: list[int], wait_each: bool, masked: bool = True) -> list:
    """prefill page A -> copy A into B -> mask a slot of B -> decode on [B, C].
    Each step reads what the previous one wrote, so any reordering changes the outputs."""
    ps = core.page_size
    a, b = queue.allocate_pages(2)
    futures: list[Future] = []

    def done(f: Future | None = None) -> None:
        if f is not None:
            futures.append(f)
        if wait_each:
            queue.synchronize().result(60)

    outputs = [Distribution(ps - 1, 8), Logprobs(ps - 1, (1, 2, 3))]
    done(queue.forward(prompt[:ps], list(range(ps)), [a], ps, None, outputs))
    queue.copy_slots(a, 0, b, 0, ps)
    done()
    if masked:
        queue.mask_slots(b, 1, 1, True)
        done()
    seq = Seq(queue, ps, [b], ps)
    done(seq.forward([prompt[ps]], [Distribution(0, 8), Sample(0)]))
    done(seq.forward([prompt[ps + 1]], [Distribution(0, 8), Logprobs(0, (4, 5))]))
    results = [f.result(60) for f in futures]
    queue.free_pages([a, *seq.pages])
    return results


def test_commands_on_one_queue_take_effect_in_order_under_concurrency(serving_core):
    core = serving_core
    prompts = [[(7 * i + j) % 380 + 1 for j in range(6)] for i in range(6)]

    def run(i: int, wait_each: bool, masked: bool = True) -> list:
        inst = core.open_instance(f"chain-{i}-{wait_each}-{masked}")
        try:
            return chain(core, inst.create_queue(0), prompts[i], wait_each, masked)
        finally:
            inst.close()

    serial = [run(i, wait_each=True) for i in range(len(prompts))]
    # The mask changes the result: this test can see a reordering.
    unmasked = run(0, wait_each=True, masked=False)
    assert unmasked[1][0][1] != pytest.approx(serial[0][1][0][1], rel=1e-4)

    for _ in range(2):
        pipelined = in_threads([lambda i=i: run(i, wait_each=False) for i in range(len(prompts))])
        for got, want in zip(pipelined, serial):
            for g, w in zip(got, want):
                assert_same_outputs(g, w)
    assert core.stats.max_batch_requests > 1


# ---------------------------------------------------------------- copy-on-write
def decode(seq: Seq, tokens: list[int]) -> list:
    return [seq.forward([t], [Distribution(0, 8), Sample(0)]).result(60) for t in tokens]


def independent(core: ServingCore, name: str, prompt: list[int], continuation: list[int]) -> list:
    inst = core.open_instance(name)
    try:
        seq = Seq(inst.create_queue(0), core.page_size)
        seq.forward(prompt, [Sample(len(prompt) - 1)]).result(60)
        return decode(seq, continuation)
    finally:
        inst.close()


def test_forks_by_export_import_never_see_each_others_writes(serving_core):
    core = serving_core
    initial_free = core.free_pages()
    prompt = [21, 22, 23, 24, 25, 26]  # 6 tokens: page 2 of 4 slots is half full and shared
    x, y = [40, 41, 42, 43, 44], [90, 91, 92, 93, 94]
    want_x = independent(core, "ref-x", prompt, x)
    want_y = independent(core, "ref-y", prompt, y)
    assert want_x != want_y

    a = core.open_instance("a")
    b = core.open_instance("b")
    qa, qb = a.create_queue(0), b.create_queue(0)
    sa = Seq(qa, core.page_size)
    sa.forward(prompt, [Sample(len(prompt) - 1)])
    qa.export_pages("prefix", sa.pages, 2, persistent=False)
    ids, last = qb.import_pages("prefix")  # waits for the export to be published
    assert last == 2 and qa.list_exports() == qb.list_exports() == ["prefix"]
    assert core.refcount("a", sa.pages[1]) == 3  # a, the export, b
    sb = Seq(qb, core.page_size, ids, len(prompt))

    got_x, got_y = in_threads([lambda: decode(sa, x), lambda: decode(sb, y)])
    for got, want in [(got_x, want_x), (got_y, want_y)]:
        for g, w in zip(got, want):
            assert_same_outputs(g, w)
    assert core.stats.pages_copied_on_write >= 2  # both wrote into the shared last page
    # The untouched first page is still shared three ways; the written one is private.
    assert core.refcount("b", ids[0]) == 3
    assert core.refcount("b", sb.pages[1]) == 1

    # A third instance importing now sees the prefix as exported, not either fork.
    c = core.open_instance("c")
    ids_c, _ = c.create_queue(0).import_pages("prefix")
    sc = Seq(c.create_queue(0), core.page_size, ids_c, len(prompt))
    for g, w in zip(decode(sc, x), want_x):
        assert_same_outputs(g, w)

    for inst in (a, b, c):
        inst.close()
    assert core.wait_idle(10)
    assert core.held_pages() == 0
    assert core.free_pages() == initial_free


def test_persistent_export_survives_its_exporter_and_namespaces_isolate(serving_core):
    core = serving_core
    prompt = [3, 1, 4, 1, 5, 9, 2]
    a = core.open_instance("writer", namespace="alice")
    sa = Seq(a.create_queue(0), core.page_size)
    sa.forward(prompt, [Sample(0)])
    sa.queue.export_pages("cache", sa.pages, 3, persistent=True)
    sa.queue.synchronize().result(60)
    a.close()
    assert core.held_pages() == 2  # held by the export alone

    mallory = core.open_instance("mallory", namespace="bob")
    qm = mallory.create_queue(0)
    assert qm.list_exports() == []
    with pytest.raises(PieError) as exc:
        qm.import_pages("cache")
    assert exc.value.code == "not-found"

    reader = core.open_instance("reader", namespace="alice")
    qr = reader.create_queue(0)
    ids, last = qr.import_pages("cache")
    sr = Seq(qr, core.page_size, ids, len(prompt))
    for g, w in zip(decode(sr, [8, 8]), independent(core, "ref", prompt, [8, 8])):
        assert_same_outputs(g, w)
    qr.unexport("cache")
    assert qr.list_exports() == []
    reader.close()
    mallory.close()
    assert core.wait_idle(10) and core.held_pages() == 0


# ---------------------------------------------------------------- faults
def codes(fn: Callable[[], object]) -> str:
    with pytest.raises(PieError) as exc:
        fn()
    return exc.value.code


def test_bad_input_is_rejected_synchronously_with_the_right_code(serving_core):
    core = serving_core
    inst = core.open_instance("bad")
    q = inst.create_queue(0)
    p = q.allocate_pages(2)
    vocab = core.engine.config.vocab_size
    max_pos = core.engine.config.max_position_embeddings
    ok = dict(tokens=[1, 2], positions=[0, 1], pages=p[:1], last_page_len=2, mask=None, outputs=[Sample(1)])

    def fwd(**changes):
        return lambda: q.forward(**{**ok, **changes})

    assert codes(fwd(pages=[p[0], 12345])) == "not-found"
    assert codes(fwd(pages=[p[0], p[0]])) == "invalid-argument"
    assert codes(fwd(pages=[])) == "invalid-argument"
    assert codes(fwd(last_page_len=0)) == "invalid-argument"
    assert codes(fwd(last_page_len=core.page_size + 1)) == "invalid-argument"
    assert codes(fwd(last_page_len=1)) == "invalid-argument"  # 2 tokens in 1 slot
    assert codes(fwd(tokens=[1, vocab])) == "invalid-argument"
    assert codes(fwd(positions=[0, max_pos])) == "invalid-argument"
    assert codes(fwd(positions=[0])) == "invalid-argument"
    assert codes(fwd(mask=np.ones((2, 3), bool))) == "invalid-argument"
    assert codes(fwd(outputs=[Sample(2)])) == "invalid-argument"
    assert codes(fwd(tokens=[])) == "invalid-argument"
    assert codes(lambda: q.copy_slots(p[0], 3, p[1], 0, 2)) == "invalid-argument"
    assert codes(lambda: q.copy_slots(p[0], 0, 999, 0, 1)) == "not-found"
    assert codes(lambda: q.mask_slots(p[0], -1, 1, True)) == "invalid-argument"
    assert codes(lambda: q.free_pages([999])) == "not-found"
    assert codes(lambda: q.import_pages("nope")) == "not-found"
    assert codes(lambda: q.unexport("nope")) == "not-found"
    assert codes(lambda: q.export_pages("e", [p[0]], 0, False)) == "invalid-argument"
    assert codes(lambda: q.allocate_pages(-1)) == "invalid-argument"
    q.free_pages([p[1]])
    assert codes(lambda: q.free_pages([p[1]])) == "not-found"  # already freed (queued)
    assert codes(fwd(pages=[p[1]])) == "not-found"  # freed ids are unusable at once
    # Nothing bad reached the engine: the queue still works.
    (token,) = q.forward(**ok).result(60)
    assert 0 <= token < vocab
    inst.close()
    assert codes(lambda: q.allocate_pages(1)) == "closed"
    assert codes(lambda: q.synchronize()) == "closed"


def test_requests_past_the_pool_or_a_quota_allocate_nothing(serving_core):
    """Out-of-memory (and nothing allocated) for what could never be served;
    a pool that is only short now makes a request wait (tests/runtime/test_pressure.py)."""
    core = serving_core
    free = core.free_pages()
    a = core.open_instance("greedy-eater")
    qa = a.create_queue(0)
    assert codes(lambda: qa.allocate_pages(free + 1)) == "out-of-memory"  # more than the whole pool
    assert a.page_count() == 0 and core.free_pages() == free
    held = qa.allocate_pages(free - 2)
    b = core.open_instance("quota", page_quota=3)
    qb = b.create_queue(0)
    assert codes(lambda: qb.allocate_pages(4)) == "out-of-memory"  # past its quota
    assert b.page_count() == 0
    qb.allocate_pages(2)
    qa.free_pages(held)
    qa.synchronize().result(60)
    qb.allocate_pages(1)
    assert codes(lambda: qb.allocate_pages(1)) == "out-of-memory"  # quota of 3
    assert b.page_count() == 3
    a.close()
    b.close()


def test_closing_with_pending_commands_cancels_them_while_others_keep_serving(serving_core):
    core = serving_core
    initial = core.free_pages()
    solo_inst = core.open_instance("solo")
    want = greedy(core, solo_inst.create_queue(0), PROMPTS[2], 8)
    solo_inst.close()

    doomed = core.open_instance("doomed")
    seq = Seq(doomed.create_queue(0), core.page_size)
    futures = [seq.forward([i % 300 + 1] * 3, [Sample(2)]) for i in range(40)]
    survivor_result: list[list[int]] = []

    def survivor() -> None:
        inst = core.open_instance("survivor")
        survivor_result.append(greedy(core, inst.create_queue(0), PROMPTS[2], 8))
        inst.close()

    t = threading.Thread(target=survivor)
    t.start()
    doomed.close()
    t.join(120)
    outcomes = []
    for f in futures:
        try:
            f.result(60)
            outcomes.append("ok")
        except PieError as exc:
            outcomes.append(exc.code)
    assert set(outcomes) <= {"ok", "closed"} and outcomes[-1] == "closed"
    assert survivor_result == [want]
    assert core.wait_idle(10)
    assert core.free_pages() == initial and core.held_pages() == 0


# ---------------------------------------------------------------- random page operations
KINDS = ["alloc", "free", "export", "export", "unexport", "import", "import", "copy", "copy", "mask", "forward", "forward",
         "run", "sync"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 1),  # which instance
        st.lists(st.integers(0, 11), min_size=1, max_size=3),  # page picks: 10 and 11 are invalid ids
        st.integers(0, 4),  # small number: count / offset / length / export name
        st.booleans(),
    ),
    max_size=30,
)


_EXAMPLES = itertools.count()
# What random operations may fail with (anything else is a bug).
EXPECTED_CODES = ("invalid-argument", "not-found", "out-of-memory", "already-exists")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_page_operations_keep_refcounts_and_return_every_page(serving_core, ops):
    core = serving_core
    ps = core.page_size
    initial = core.free_pages()
    # Fresh ids per example: an example that fails leaves its instances open,
    # and the next one must still report its own outcome.
    example = next(_EXAMPLES)
    insts = [core.open_instance(f"h{i}-{example}", namespace="shared", page_quota=12) for i in range(2)]
    queues = [inst.create_queue(0) for inst in insts]
    held = [q.allocate_pages(3) for q in queues]  # ids each instance believes it holds
    futures: list[Future] = []

    def pick(i: int, k: int) -> int:
        return held[i][k % len(held[i])] if held[i] and k < 10 else 1000 + k

    for kind, i, picks, n, flag in ops:
        q = queues[i]
        pages = [pick(i, k) for k in picks]
        try:
            if kind == "alloc":
                held[i] += q.allocate_pages(n)
            elif kind == "free":
                q.free_pages(pages)
                held[i] = [p for p in held[i] if p not in pages]
            elif kind == "export":
                q.export_pages(f"e{n % 2}", pages, n % ps + 1, flag)
            elif kind == "unexport":
                q.unexport(f"e{n % 2}")
            elif kind == "import":
                got, _ = q.import_pages(f"e{n % 2}")
                held[i] += got
            elif kind == "copy":
                q.copy_slots(pages[0], n % ps, pages[-1], (n * 3) % ps, n % 3)
            elif kind == "mask":
                q.mask_slots(pages[0], n % ps, 1, flag)
            elif kind == "forward":
                tokens = [7 + n] * (n % 2 + 1)
                last = n % ps + 1
                futures.append(q.forward(tokens, [0, 1][: len(tokens)], pages, last, None, [Sample(0)]))
            elif kind == "run":  # draws with index 1 and first passes without a sample are invalid
                tokens = [9 + n] * (n % 2 + 1)
                first = [Sample(len(tokens) - 1)] if flag or n else []
                futures.append(q.forward_run(tokens, [0, 1][: len(tokens)], pages, n % ps + 1, first,
                                             [Sample(n // 4)] * (n % 3)))
            elif kind == "sync":
                futures.append(q.synchronize())
        except PieError as exc:
            assert exc.code in EXPECTED_CODES, exc
        core.check_invariants()
    for f in futures:
        try:
            f.result(60)
        except PieError as exc:
            assert exc.code in EXPECTED_CODES, exc
    core.check_invariants()
    for inst in insts:
        inst.close()
    core.check_invariants()
    # Persistent exports outlive their exporters: withdraw them, then every page is back.
    cleanup = core.open_instance("cleanup", namespace="shared")
    qc = cleanup.create_queue(0)
    for name in qc.list_exports():
        qc.unexport(name)
    cleanup.close()
    assert core.wait_idle(10)
    assert core.held_pages() == 0 and core.free_pages() == initial


_RUN_PROMPTS = PROMPTS[:3]


@pytest.fixture(scope="module")
def per_token_greedy(runtime_engine) -> dict[int, list[int]]:
    """20 greedy tokens after each of `_RUN_PROMPTS`, one forward per token."""
    core = ServingCore(runtime_engine).start()
    try:
        inst = core.open_instance("oracle")
        expected = {i: greedy(core, inst.create_queue(0), p, 20) for i, p in enumerate(_RUN_PROMPTS)}
        inst.close()
        core.wait_idle()
    finally:
        core.stop()
    return expected


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(_RUN_PROMPTS) - 1), runs=st.lists(st.integers(1, 7), min_size=1, max_size=4))
def test_decode_runs_of_any_lengths_equal_the_per_token_loop(serving_core, per_token_greedy, which, runs):
    """forward-run: each pass fed the token the one before drew, on pages laid
    out for the whole run (runs cross page boundaries at random)."""
    core = serving_core
    inst = core.open_instance("runs")
    q = inst.create_queue(0)
    seq = Seq(q, core.page_size)
    step, out = list(_RUN_PROMPTS[which]), []
    for length in runs:
        length = min(length, 20 - len(out))
        if length < 1:
            break
        need = math.ceil((seq.length + len(step) + length - 1) / seq.page_size) - len(seq.pages)
        if need > 0:
            seq.pages += q.allocate_pages(need)
        positions = list(range(seq.length, seq.length + len(step)))
        seq.length += len(step) + length - 1
        last = seq.length - (len(seq.pages) - 1) * seq.page_size
        drawn = q.forward_run(step, positions, seq.pages, last, [Sample(len(step) - 1)],
                              [Sample(0)] * (length - 1)).result(60)
        assert len(drawn) == length
        out += drawn
        step = [drawn[-1]]
    assert out == per_token_greedy[which][:len(out)]
    q.free_pages(seq.pages)
    inst.close()
    core.wait_idle()
