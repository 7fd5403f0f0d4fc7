"""Fixtures for the serving-core tests: a real Engine on the tiny random Llama
(session-wide: compiled step shapes are reused) and a fresh ServingCore per test."""

from __future__ import annotations

from typing import Iterator

import pytest

from pie_runtime import ServingCore

RUNTIME_PAGE_SIZE = 4  # small pages: short prompts already span several
RUNTIME_NUM_PAGES = 64


@pytest.fixture(scope="session")
def runtime_engine(tiny_llama_model):
    """A real Engine shared by the runtime tests; every test must give back all its pages."""
    from engine_jax.engine import Engine

    return Engine(tiny_llama_model, page_size=RUNTIME_PAGE_SIZE, num_pages=RUNTIME_NUM_PAGES)


@pytest.fixture
def serving_core(runtime_engine) -> Iterator[ServingCore]:
    """A started ServingCore (adaptive policy) on the shared engine. On teardown
    it checks that the test left no page behind."""
    assert runtime_engine.pool.num_free == runtime_engine.num_pages, "an earlier test leaked pages"
    core = ServingCore(runtime_engine).start()
    try:
        yield core
        core.check_invariants()
    finally:
        core.stop()
    assert runtime_engine.pool.num_free == runtime_engine.num_pages


# Shared by the Wasm host tests (test_host*.py): the probe guest and a serving
# core on the tiny model with the guests' page size, one per test module.
@pytest.fixture(scope="module")
def probe():
    from tests.runtime.guests.fixtures import component_cache, load_guest

    return load_guest(component_cache(), "probe")


@pytest.fixture(scope="module")
def engine(tiny_llama_model):
    from engine_jax.engine import Engine
    from tests.runtime.guests.fixtures import NUM_PAGES, PAGE_SIZE

    return Engine(tiny_llama_model, page_size=PAGE_SIZE, num_pages=NUM_PAGES)


@pytest.fixture(scope="module")
def core(engine):
    core = ServingCore(engine).start()
    yield core
    core.stop()
