"""Fixtures for the toolchain tests: real components, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_inferlets"


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private build cache, so tests neither read nor pollute ~/.cache/pie."""
    return tmp_path_factory.mktemp("pie-build-cache")


@pytest.fixture(scope="session")
def text_completion_wasm(build_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample_inferlets/text_completion.py built by pie-build (one real build)."""
    from inferlet_toolchain.build import build

    out = tmp_path_factory.mktemp("built") / "text-completion.wasm"
    return build(SAMPLES / "text_completion.py", out, cache_dir=build_cache, quiet=True)
