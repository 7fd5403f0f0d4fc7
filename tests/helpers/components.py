"""Sample inferlets built and precompiled once, in the tests' PIE_HOME (cached across sessions)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def built_component(name: str) -> Path:
    """``sample_inferlets/{name}.py`` built by pie-build and precompiled by wasmtime."""
    from inferlet_toolchain.build import build
    from pie_runtime.component_cache import ComponentCache
    from tests.runtime.guests.fixtures import PRECOMPILED, TEST_PIE_HOME

    wasm = Path(build(REPO / "sample_inferlets" / f"{name}.py", TEST_PIE_HOME / "samples" / f"{name}.wasm",
                      quiet=True))
    ComponentCache(PRECOMPILED).load(wasm)
    return wasm
