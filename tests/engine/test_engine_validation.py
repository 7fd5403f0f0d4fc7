"""Every bad input is an EngineInputError naming the problem, and the engine keeps working after it."""

from __future__ import annotations

import numpy as np
import pytest

from engine_jax.batch import Distribution, EngineInputError, ForwardRequest, Logprobs, Sample
from engine_jax.engine import Engine

PS = 4


@pytest.fixture(scope="module")
def engine(tiny_llama_model):
    return Engine(tiny_llama_model, page_size=PS, num_pages=16)


@pytest.fixture
def pages(engine):
    ids = engine.pool.alloc(3)
    yield ids
    engine.pool.free(ids)


def good(owned, **changes) -> ForwardRequest:
    fields = dict(tokens=[1, 2, 3], positions=[0, 1, 2], pages=owned[:1], last_page_len=3,
                  outputs=(Sample(index=2),))
    fields.update(changes)
    return ForwardRequest(**fields)


V = 384  # the test tokenizer's vocabulary


@pytest.mark.parametrize("changes, message", [
    (dict(tokens=[]), "tokens is empty"),
    (dict(tokens=[1, V, 3]), f"token id {V} is outside the vocabulary"),
    (dict(tokens=[1, -1, 3]), "token id -1 is outside the vocabulary"),
    (dict(tokens=[1.5, 2, 3]), "tokens must be a flat list of integers"),
    (dict(positions=[0, 1]), "len(positions)=2 != len(tokens)=3"),
    (dict(positions=[0, 1, 512]), "position 512 is outside 0..511"),
    (dict(positions=[0, -3, 1]), "position -3 is outside"),
    (dict(pages=[]), "pages is empty"),
    (dict(pages=[99]), "page id 99 is out of range 0..15"),
    (dict(pages=[15]), "page 15 is not allocated"),
    (dict(last_page_len=0), "last_page_len=0 is not in 1..4"),
    (dict(last_page_len=5), "last_page_len=5 is not in 1..4"),
    (dict(last_page_len=2), "3 new tokens do not fit in a sequence of 2 slots"),
    (dict(mask=np.ones((3, 2), bool)), "mask has shape (3, 2), expected (3, 3)"),
    (dict(mask=np.ones((3, 3), np.int32)), "mask must be boolean"),
    (dict(outputs=(Sample(index=3),)), "outputs[0].index=3 is out of range 0..2"),
    (dict(outputs=(Logprobs(index=0, token_ids=(1,)), Sample(index=-1))), "outputs[1].index=-1"),
    (dict(outputs=(Sample(index=0, temperature=-1.0),)), "temperature=-1.0 must be finite and >= 0"),
    (dict(outputs=(Sample(index=0, temperature=float("nan")),)), "temperature=nan"),
    (dict(outputs=(Sample(index=0, top_k=V + 1),)), f"top_k={V + 1} is out of range 0..{V}"),
    (dict(outputs=(Sample(index=0, top_p=0.0),)), "top_p=0.0 must be in (0, 1]"),
    (dict(outputs=(Sample(index=0, top_p=1.5),)), "top_p=1.5 must be in (0, 1]"),
    (dict(outputs=(Sample(index=0, min_p=-0.1),)), "min_p=-0.1 must be in [0, 1]"),
    (dict(outputs=(Sample(index=0, seed=-1),)), "seed=-1 must be in 0..2**64-1"),
    (dict(outputs=(Sample(index=0, allowed=np.ones(10, bool)),)), f"allowed must be bool[{V}]"),
    (dict(outputs=(Sample(index=0, allowed=np.zeros(V, bool)),)), "allowed allows no token"),
    (dict(outputs=(Distribution(index=0, k=0),)), f"k=0 is out of range 1..{V}"),
    (dict(outputs=(Distribution(index=0, k=V + 1),)), f"k={V + 1} is out of range"),
    (dict(outputs=(Distribution(index=0, k=3, temperature=0.0),)), "temperature=0.0 must be finite and > 0"),
    (dict(outputs=(Logprobs(index=0, token_ids=(5, V)),)), f"token_ids contains {V}"),
    (dict(outputs=("greedy",)), "outputs[0] is a str"),
])
def test_validate_rejects_bad_requests(engine, pages, changes, message):
    req = good(pages, **changes)
    with pytest.raises(EngineInputError) as info:
        engine.validate(req)
    assert message in str(info.value)
    with pytest.raises(EngineInputError, match=r"^request 1: "):
        engine.step([good(pages[1:]), req])
    # The engine still runs a good batch afterwards.
    [[token]] = engine.step([good(pages)])
    assert 0 <= token < V


def test_duplicate_page_in_one_request(engine, pages):
    with pytest.raises(EngineInputError, match="more than once"):
        engine.validate(good(pages, pages=[pages[0], pages[0]], last_page_len=1))


def test_two_requests_writing_the_same_slot_are_rejected(engine, pages):
    with pytest.raises(EngineInputError, match=f"requests 0 and 1 both write slot 0 of page {pages[0]}"):
        engine.step([good(pages), good(pages)])
    assert engine.step([good(pages)])[0][0] >= 0


def test_device_ops_check_their_ranges(engine, pages):
    with pytest.raises(EngineInputError, match="source page id 16 is out of range"):
        engine.copy_slots(16, 0, pages[0], 0, 1)
    with pytest.raises(EngineInputError, match="destination slots 3..4 do not fit"):
        engine.copy_slots(pages[0], 0, pages[1], 3, 2)
    with pytest.raises(EngineInputError, match="page 15 is not allocated"):
        engine.copy_page(pages[0], 15)
    with pytest.raises(EngineInputError, match="mask slots -1"):
        engine.set_valid(pages[0], -1, 1, False)
