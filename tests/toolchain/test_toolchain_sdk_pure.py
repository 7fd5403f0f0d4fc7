"""The SDK's pure-Python parts, on host CPython (no Wasm bindings needed)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferlet_toolchain.inferlet import brle
from inferlet_toolchain.inferlet.args import Args, ArgSpec, parse
from inferlet_toolchain.inferlet.drafter import Drafter, NgramDrafter
from inferlet_toolchain.inferlet.loop import PollLoop, run, wait
from inferlet_toolchain.inferlet.sampling import Sampler, Stop


def test_pure_modules_do_not_load_bindings() -> None:
    assert "wit_world" not in sys.modules
    import inferlet_toolchain.inferlet as sdk

    with pytest.raises(ModuleNotFoundError, match="wit_world|componentize_py_types"):
        sdk.Context  # noqa: B018 - guest-only, loaded lazily


# BRLE ------------------------------------------------------------------------
@given(st.lists(st.booleans(), max_size=200))
def test_brle_round_trip(mask: list[bool]) -> None:
    runs = brle.encode(mask)
    assert brle.decode(runs) == mask
    assert brle.length(runs) == len(mask)
    assert all(r > 0 for r in runs[1:])  # canonical: only the first run may be 0


def test_brle_examples() -> None:
    assert brle.decode([0, 3, 2]) == [True, True, True, False, False]
    assert brle.encode([]) == [0]
    assert brle.from_ranges(6, [(1, 3), (5, 6)]) == [1, 2, 2, 1]
    assert brle.from_indices(4, [0, 3]) == [0, 1, 2, 1]
    assert brle.causal(2, 2) == [[0, 3], [0, 4]]
    with pytest.raises(ValueError, match="outside"):
        brle.from_indices(3, [3])
    with pytest.raises(ValueError, match=">= 0"):
        brle.decode([1, -1])


# Samplers and stops --------------------------------------------------------------
def test_sampler_presets() -> None:
    assert Sampler.greedy().is_greedy
    assert Sampler.topp(0.9, temperature=0.7) == Sampler(temperature=0.7, top_p=0.9)
    assert Sampler.topk(40).top_k == 40 and Sampler.minp(0.1).min_p == 0.1
    fields = Sampler.random(0.8, top_p=0.95, seed=7).spec_fields(index=3, step=0)
    assert fields["index"] == 3 and fields["top_p"] == 0.95 and fields["seed"] is not None
    assert Sampler.greedy().spec_fields(0, 0)["seed"] is None
    assert Sampler.greedy().with_allowed([0, 5, 1]).spec_fields(0, 0)["allowed"] == [0, 5, 1]


def test_sampler_seeds_are_reproducible_and_distinct_per_step() -> None:
    s = Sampler.random(seed=42)
    seeds = [s.step_seed(i) for i in range(100)]
    assert seeds == [Sampler.random(seed=42).step_seed(i) for i in range(100)]
    assert len(set(seeds)) == 100 and all(0 <= x < 2**64 for x in seeds)
    assert Sampler.random(seed=43).step_seed(0) != seeds[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 1}, "min_p"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_sampler_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


def test_stop_conditions() -> None:
    stop = Stop(max_tokens=5, strings=["\n\n"]).bind(eos_tokens=[2])
    assert stop.check([7, 8]) is None
    assert stop.check([7, 2]) == "eos"
    assert stop.check([1, 1, 1, 1, 1]) == "max-tokens"
    assert stop.check([7], "a\n\nb") == "stop-string"
    assert stop.trim("a\n\nb\n\n") == "a"
    assert stop.needs_text
    assert Stop(eos=False).bind([2]).check([2]) is None
    assert Stop(tokens=[9]).bind([]).check([9]) == "eos"
    with pytest.raises(ValueError):
        Stop(max_tokens=0)
    with pytest.raises(ValueError):
        Stop(strings=[""])


def test_ngram_drafter() -> None:
    d = NgramDrafter(n=2, max_draft=3)
    assert isinstance(d, Drafter)
    assert d.draft([1, 2, 3, 4, 5, 1, 2]) == [3, 4, 5]
    assert d.draft([1, 2, 3]) == []
    assert d.draft([5, 1, 2, 9, 1, 2]) == [9, 1, 2]  # most recent earlier match wins


def test_args_object() -> None:
    specs = [ArgSpec("max-tokens", "int", 3), ArgSpec("chat", "bool")]
    args = Args(parse(specs, ["--chat"]))
    assert args.max_tokens == 3 and args.chat is True and args["max-tokens"] == 3
    with pytest.raises(AttributeError, match="no argument named 'nope'"):
        args.nope  # noqa: B018


# The event loop ---------------------------------------------------------------
class FakeHost:
    """Host futures that resolve in rounds, when the guest polls (like a batch)."""

    def __init__(self) -> None:
        self.pending: list[FakeFuture] = []
        self.polls: list[int] = []

    def submit(self, value) -> "FakeFuture":
        fut = FakeFuture(self, value)
        self.pending.append(fut)
        return fut

    def poll(self, pollables, timeout_ms):
        self.polls.append(len(pollables))
        for fut in self.pending:
            fut.done = True
        self.pending = []
        return [i for i, p in enumerate(pollables) if p.future.done]


class FakePollable:
    def __init__(self, future: "FakeFuture") -> None:
        self.future = future
        self.released = False

    def ready(self) -> bool:
        return self.future.done

    def __exit__(self, *exc) -> None:
        self.released = True


class FakeFuture:
    def __init__(self, host: FakeHost, value) -> None:
        self.host, self.value, self.done = host, value, False

    def pollable(self) -> FakePollable:
        return FakePollable(self)

    def get(self):
        assert self.done, "get() before the host resolved it"
        return self.value


def test_gather_waits_on_all_host_futures_in_one_poll() -> None:
    host = FakeHost()

    async def worker(i: int) -> int:
        total = 0
        for step in range(3):
            total += await wait(host.submit(i * 10 + step))
        return total

    async def main() -> list[int]:
        return await asyncio.gather(*(worker(i) for i in range(4)))

    assert run(main(), host.poll) == [3, 33, 63, 93]
    # Each round polls the four workers' futures together: 3 rounds, 4 each.
    assert host.polls == [4, 4, 4]


def test_sleep_timeouts_and_errors() -> None:
    host = FakeHost()

    async def main() -> str:
        await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        task = asyncio.ensure_future(asyncio.sleep(0))
        await task
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run(main(), host.poll)


def test_deadlock_is_reported() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(RuntimeError, match="deadlock"):
        run(main(), FakeHost().poll)


def test_wait_outside_the_poll_loop_is_refused() -> None:
    fut = FakeHost().submit(1)
    with pytest.raises(RuntimeError, match="inferlet event loop"):
        asyncio.run(wait(fut))


def test_loop_is_not_reentrant() -> None:
    loop = PollLoop(FakeHost().poll)

    async def inner() -> None:
        loop.run_until_complete(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="already running"):
        loop.run_until_complete(inner())
