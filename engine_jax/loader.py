"""One entry point from "a model the user named" to engine-ready parameters and a tokenizer.

``load_model`` accepts a registry name (converted and cached on first use), a GGUF file, a
Hugging Face checkpoint directory, or a converted-model directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax import checkpoint, gguf, registry
from engine_jax.families import config_from_hf, params_from_state_dict
from engine_jax.tokenizer import Tokenizer


class ModelNotFoundError(ValueError):
    """The name is neither a known model nor a loadable path."""


@dataclass
class LoadedModel:
    name: str
    config: Any  # the family's config (engine_jax.families)
    params: Any  # the family's params
    tokenizer: Tokenizer
    hf_config: dict[str, Any] = field(default_factory=dict)  # the config.json it came from
    source: str = ""  # where the weights were read from
    load_seconds: float = 0.0


@dataclass
class HostModel:
    """A model read into host memory: HF config dict, HF-named numpy state dict, tokenizer."""

    name: str
    hf_config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    tokenizer: Tokenizer
    source: str


def default_dtype() -> jnp.dtype:
    """float32 on CPU (exactness, speed of CPU matmuls), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def read_model(name_or_path: str | Path) -> HostModel:
    """Read weights, config and tokenizer into host memory, from whichever source is named."""
    text = str(name_or_path)
    if text in registry.KNOWN_MODELS:
        directory = registry.pull(text)
        converted = checkpoint.restore_converted(directory)
        return HostModel(text, converted.config, converted.state_dict, converted.tokenizer, str(directory))
    path = Path(text).expanduser()
    if path.is_file():
        if not gguf.is_gguf(path):
            raise ModelNotFoundError(f"{path}: not a GGUF file (expected a .gguf file or a model directory)")
        model = gguf.load_gguf(path)
        return HostModel(path.stem, model.config, model.state_dict, model.tokenizer, str(path))
    if path.is_dir():
        if checkpoint.is_converted(path):
            converted = checkpoint.restore_converted(path)
            return HostModel(path.name, converted.config, converted.state_dict, converted.tokenizer, str(path))
        if (path / "config.json").is_file():
            from engine_jax.weights import load_hf_checkpoint

            config, state = load_hf_checkpoint(path)
            return HostModel(path.name, config, state, Tokenizer.from_directory(path), str(path))
        raise ModelNotFoundError(
            f"{path}: not a model directory (no config.json of a Hugging Face checkpoint, "
            f"no {checkpoint.MARKER} of a converted model)"
        )
    raise ModelNotFoundError(
        f"{text!r} is neither a known model ({', '.join(sorted(registry.KNOWN_MODELS))}) "
        f"nor an existing GGUF file or model directory"
    )


def load_model(name_or_path: str | Path, dtype: Any = None) -> LoadedModel:
    """Load a model for the engine; ``dtype`` defaults to :func:`default_dtype`."""
    started = time.perf_counter()
    host = read_model(name_or_path)
    config = config_from_hf(host.hf_config)
    if host.tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{host.source}: tokenizer has {host.tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {config.vocab_size}"
        )
    params = params_from_state_dict(config, host.state_dict, dtype or default_dtype())
    return LoadedModel(
        name=host.name,
        config=config,
        params=params,
        tokenizer=host.tokenizer,
        hf_config=host.hf_config,
        source=host.source,
        load_seconds=time.perf_counter() - started,
    )
