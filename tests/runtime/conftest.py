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
