"""Session-wide fixtures: tiny random Hugging Face checkpoints, built once per test session.

* ``small_model_dir(family)`` -> Path of a checkpoint directory for a family in
  ``tests.helpers.hf_models.ALL_FAMILIES`` ("llama", "qwen2", "qwen3", "mistral", "gemma3"):
  config.json, model.safetensors, tokenizer.json, tokenizer_config.json
  (ChatML template; special tokens <|endoftext|>, <|im_start|>, <|im_end|>).
* ``tiny_llama_dir`` -> the "llama" one (Llama 3 rope scaling, tied embeddings).
* ``tiny_llama_model`` -> that checkpoint loaded for ``Engine`` (float32).

Treat the directories as read-only: other tests share them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

# `tests.helpers` is imported by path from the repository root, which a bare `pytest` run does not put on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers.hf_models import ALL_FAMILIES, build_model_dir


@pytest.fixture(scope="module", autouse=True)
def _bounded_memory_mappings():
    """The suite compiles hundreds of executables in one process, and each holds memory
    mappings (see engine_jax.map_budget); past half the kernel's limit, drop them after a module."""
    yield
    from engine_jax.map_budget import MapBudget

    MapBudget().check()


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in ALL_FAMILIES:
            raise ValueError(f"unknown test family {family!r}; choose one of {ALL_FAMILIES}")
        if family not in built:
            built[family] = build_model_dir(family, tmp_path_factory.mktemp(f"hf-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(small_model_dir: Callable[[str], Path]) -> Path:
    return small_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_llama_model(tiny_llama_dir: Path):
    from tests.helpers.engine_models import load_test_model

    return load_test_model(tiny_llama_dir)
