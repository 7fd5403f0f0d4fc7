"""Chunked prefill: under a token budget a long forward runs in chunks over several steps.

On the real engine (tiny random Llama, page sizes 4 and 16) a chunked run
computes what the whole forward computes, with a custom mask, outputs in the
middle, shared (copy-on-write) and masked pages, and a decode run behind it.
With the recording engine of test_scheduler.py: decoders get a token in every
step between chunks (read from the scheduler's step log), FIFO holds, a
failing chunk fails the forward alone, and closing mid-chunks leaks no page.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine_jax.batch import Distribution, Logprobs, Sample
from pie_runtime import PieError, ServingCore
from tests.runtime.test_scheduler import RecordingEngine

BUDGET = 5  # odd, so chunks end inside pages of either size


def _mask(first_slot: int, n: int, masked_slot: int) -> np.ndarray:
    """Causal over `n` new tokens after `first_slot` slots, except: tokens 0-6 see each other
    (a bidirectional block a chunk may not cut), no token sees `masked_slot`, and
    token 12 does not see tokens 8-10."""
    total = first_slot + n
    slots = first_slot + np.arange(n)
    mask = np.arange(total)[None, :] <= slots[:, None]
    mask[:7, first_slot:first_slot + 7] = True
    mask[:, masked_slot] = False
    mask[12, first_slot + 8:first_slot + 11] = False
    return mask


def _scenario(core: ServingCore) -> tuple[list, list]:
    """A prefix, shared through an export (so the next forward's pages need copy-on-write),
    one slot masked, then a 23-token forward with a custom mask and outputs at several
    indices, and a decode run over a 13-token prompt."""
    ps = core.page_size
    inst = core.open_instance("chunked")
    q = inst.create_queue(0)
    prefix = [5, 17, 42, 99, 7, 3]
    pages = q.allocate_pages(-(-(len(prefix) + 23) // ps))
    used = -(-len(prefix) // ps)
    q.forward(prefix, range(6), pages[:used], len(prefix) - (used - 1) * ps, None, []).result(60)
    q.mask_slots(pages[0], 1, 1, True)
    q.export_pages("prefix", pages[:used], len(prefix) - (used - 1) * ps, persistent=False)
    core.instance("chunked").create_queue(0).import_pages("prefix")  # keeps the prefix's pages shared
    new = [(11 * i + 3) % 250 for i in range(23)]
    total = len(prefix) + len(new)
    outputs = [Distribution(3, k=8), Logprobs(11, (1, 2, 3, 200)), Sample(15), Distribution(22, k=8), Sample(22)]
    main = q.forward(new, range(6, total), pages, total - (len(pages) - 1) * ps,
                     _mask(len(prefix), len(new), masked_slot=2), outputs)
    run_pages = q.allocate_pages(-(-16 // ps))
    run = q.forward_run(list(range(30, 43)), range(13), run_pages, 16 - (len(run_pages) - 1) * ps,
                        [Distribution(12, k=4), Sample(12)], [Sample(0)] * 3)
    results = main.result(60), run.result(60)
    core.close_instance("chunked")
    return results


def _assert_same(chunked: list, whole: list) -> None:
    for got, want in zip(chunked, whole):
        if isinstance(want, int):
            assert got == want
        elif isinstance(want, tuple):  # distribution: same ids, same probabilities
            assert got[0] == want[0]
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def engine_16(tiny_llama_model):
    from engine_jax.engine import Engine

    return Engine(tiny_llama_model, page_size=16, num_pages=16)


@pytest.mark.parametrize("page_size", [4, 16])
def test_chunked_forward_computes_what_the_whole_forward_computes(page_size, runtime_engine, engine_16):
    engine = runtime_engine if page_size == 4 else engine_16
    with ServingCore(engine) as core:
        whole_main, whole_run = _scenario(core)
        assert all(e.chunk is None for step in core.recent_steps() for e in step)
    with ServingCore(engine, token_budget=BUDGET) as core:
        main, run = _scenario(core)
        chunks = [e.chunk for step in core.recent_steps() for e in step if e.chunk is not None]
        assert core.stats.forwards_split == 3 and core.stats.prefill_chunks == len(chunks)
    _assert_same(main, whole_main)
    _assert_same(run, whole_run)
    # The prefix, the 23-token forward and the run's first pass ran in chunks of at most
    # BUDGET tokens, except where the mask forbids a cut: tokens 0-6 see each other.
    assert chunks == [(0, 5), (5, 6),
                      (0, 7), (7, 12), (12, 17), (17, 22), (22, 23),
                      (0, 5), (5, 10), (10, 13)]
    assert engine.pool.num_free == engine.num_pages


# ------------------------------------------------------------ scheduling, on the recording engine
@pytest.fixture
def fake():
    engine = RecordingEngine()
    with ServingCore(engine, token_budget=4) as core:
        yield engine, core


def _decoder_forwards(queue, pages, count: int) -> list:
    return [queue.forward([100 + i], [i], pages, 1, None, [Sample(0)]) for i in range(count)]


def test_decoders_get_a_token_in_every_step_between_chunks_and_fifo_holds(fake):
    engine, core = fake
    decoders = [core.open_instance(f"d{i}").create_queue(0) for i in range(2)]
    long_q = core.open_instance("long").create_queue(0)
    dec_pages = [q.allocate_pages(1) for q in decoders]
    pages = long_q.allocate_pages(5)
    blocker_q = core.open_instance("blocker").create_queue(0)
    engine.gate.clear()  # hold a first step so that everything below is queued together
    blocker = _decoder_forwards(blocker_q, blocker_q.allocate_pages(1), 1)
    assert engine.in_step.wait(5)
    decoding = [f for q, p in zip(decoders, dec_pages) for f in _decoder_forwards(q, p, 8)]
    prompt = list(range(1, 18))  # 17 tokens, outputs in three different chunks
    long_f = long_q.forward(prompt, range(17), pages[:5], 1, None, [Sample(16), Sample(1), Sample(8)])
    behind = long_q.forward([77], [17], pages, 2, None, [Sample(0)])
    engine.gate.set()
    assert long_f.result(5) == [1017, 1002, 1009]  # each output from its chunk, in the original order
    assert behind.result(5) == [1077]
    for f in blocker + decoding:
        f.result(5)
    steps = core.recent_steps()
    long = [(i, e.chunk) for i, step in enumerate(steps) for e in step if e.instance_id == "long"]
    # Each step: both decoders' token, and the 2 tokens the budget leaves go to the prompt.
    assert [c for _, c in long] == [(2 * k, 2 * k + 2) for k in range(7)] + [(14, 16), (16, 17), None]
    for i, _ in long[:8]:
        assert sorted(e.instance_id for e in steps[i]) == ["d0", "d1", "long"]
        assert sum(e.tokens for e in steps[i]) == 4
    assert [i for i, _ in long[:9]] == list(range(long[0][0], long[0][0] + 9))  # a chunk every step
    assert long[-1][0] > long[-2][0]  # the forward queued behind the prompt ran after its last chunk
    assert core.stats.forwards_split == 1 and core.stats.prefill_chunks == 9


def test_decoders_that_resubmit_after_each_token_share_the_chunks_steps(fake):
    """Decoders on their own threads issue their next token only once the last one is back:
    the adaptive policy waits for them (at most a step's latency) rather than run a chunk alone."""
    engine, core = fake
    engine.step_seconds = 0.03
    stop = threading.Event()
    tokens = [0, 0]

    def decode(i: int) -> None:
        q = core.open_instance(f"d{i}").create_queue(0)
        pages = q.allocate_pages(1)
        while not stop.is_set():
            _decoder_forwards(q, pages, 1)[0].result(5)
            tokens[i] += 1

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 5
        while min(tokens) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        q = core.open_instance("long").create_queue(0)
        q.forward(list(range(1, 41)), range(40), q.allocate_pages(10), 4, None, [Sample(39)]).result(10)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    chunk_steps = [step for step in core.recent_steps() if any(e.instance_id == "long" for e in step)]
    assert len(chunk_steps) >= 18  # about 40 / (4 - 2 decoders' tokens) steps; 10 if it ran alone
    shared = sum(sorted(e.instance_id for e in step) == ["d0", "d1", "long"] for step in chunk_steps)
    assert shared >= 0.8 * len(chunk_steps), [[e.instance_id for e in step] for step in chunk_steps]


def test_a_decode_run_behind_a_chunked_prompt_draws_from_its_last_chunk(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    pages = q.allocate_pages(3)
    run = q.forward_run(list(range(1, 10)), range(9), pages, 12 - 8, [Sample(8)], [Sample(0)] * 3)
    assert run.result(5) == [1009, 2009, 3009, 4009]  # each draw fed the token drawn before it
    assert engine.batches == [[(1, 2, 3, 4)], [(5, 6, 7, 8)], [(9,)], [(1009,)], [(2009,)], [(3009,)]]


def test_a_failing_chunk_fails_its_forward_alone(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    other = core.open_instance("b").create_queue(0)
    pages, other_pages = q.allocate_pages(3), other.allocate_pages(1)
    bad = q.forward([1, 2, 3, 4, 5, 666, 7, 8, 9, 10], range(10), pages, 2, None, [Sample(0), Sample(9)])
    after = q.forward([20], [10], pages, 3, None, [Sample(0)])
    with pytest.raises(PieError) as exc:
        bad.result(5)
    assert exc.value.code == "invalid-argument" and "666" in exc.value.message
    assert after.result(5) == [1020]  # the queue goes on with its next command
    assert other.forward([5], [0], other_pages, 1, None, [Sample(0)]).result(5) == [1005]
    ran = [t for batch in engine.batches for t in batch]
    assert (1, 2, 3, 4) in ran and not any(9 in t for t in ran)  # nothing after the failed chunk
    assert core.stats.forwards_failed == 1 and core.stats.forwards_split == 0


def test_closing_an_instance_between_chunks_leaks_no_page(fake):
    engine, core = fake
    q = core.open_instance("a").create_queue(0)
    q.allocate_pages(2)  # held, not used: released with the instance
    pages = q.allocate_pages(4)
    engine.gate.clear()
    f = q.forward(list(range(1, 17)), range(16), pages, 4, None, [Sample(15)])
    assert engine.in_step.wait(5)  # the first chunk is in flight
    core.close_instance("a")
    engine.gate.set()
    with pytest.raises(PieError) as exc:
        f.result(5)
    assert exc.value.code == "closed"
    assert core.wait_idle(5)
    assert engine.batches == [[(1, 2, 3, 4)]]  # no chunk ran after the close
    assert engine.pool.num_free == engine.pool.num_pages
    core.check_invariants()
