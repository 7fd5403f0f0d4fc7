"""Adapters from a Hugging Face test checkpoint to what ``engine_jax.engine.Engine`` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from engine_jax.families import config_from_hf, params_from_state_dict
from engine_jax.weights import load_hf_checkpoint


@dataclass
class TestModel:
    """The fields Engine reads from a loaded model (engine_jax.loader.LoadedModel has the same ones)."""

    __test__ = False  # not a pytest test class

    name: str
    config: Any
    params: Any
    tokenizer: Any
    hf_config: dict = field(default_factory=dict)


def load_test_model(directory: Path, dtype: Any = jnp.float32, weights: str = "float") -> TestModel:
    """Reads config, weights (stored as ``weights``: float or int8) and tokenizer of ``directory``
    with the engine's own readers."""
    from engine_jax.tokenizer import Tokenizer

    hf_config, state_dict = load_hf_checkpoint(directory)
    config = config_from_hf(hf_config)
    return TestModel(
        name=Path(directory).name,
        config=config,
        params=params_from_state_dict(config, state_dict, dtype, weights=weights),
        tokenizer=Tokenizer.from_directory(directory),
        hf_config=hf_config,
    )
