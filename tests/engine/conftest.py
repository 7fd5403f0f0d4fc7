"""Engine-test fixtures: each family's checkpoint loaded both by transformers and by our engine."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.helpers.engine_models import TestModel, load_test_model
from tests.helpers.hf_models import load_hf_model


@pytest.fixture(scope="session")
def family_models(small_model_dir: Callable[[str], Path]) -> Callable[[str], tuple[object, TestModel]]:
    """family -> (transformers model, engine TestModel), each loaded once per session."""
    loaded: dict[str, tuple[object, TestModel]] = {}

    def get(family: str):
        if family not in loaded:
            directory = small_model_dir(family)
            loaded[family] = (load_hf_model(directory), load_test_model(directory))
        return loaded[family]

    return get
