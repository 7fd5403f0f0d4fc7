"""One entry point from "a model the user named" to engine-ready parameters and a tokenizer.

``load_model`` accepts a registry name (converted and cached on first use), a GGUF file, a
Hugging Face checkpoint directory, or a converted-model directory.

With a mesh (tensor parallelism, ``engine_jax.sharding``) the weights go to the devices
without a whole copy of the model on the host first: a converted model's orbax checkpoint
restores each device's shard straight onto it, a safetensors file is memory-mapped and each
device's slice read from it, and each layer is then assembled on the devices it lives on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax import checkpoint, gguf, registry
from engine_jax.families import config_from_hf, params_from_state_dict
from engine_jax.sharding import TensorParallel
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
    """A model read for loading: HF config dict, HF-named state dict (numpy arrays, memory maps, jax
    arrays restored onto a mesh, or ``weights.LazyTensor``s read one at a time), tokenizer."""

    name: str
    hf_config: dict[str, Any]
    state_dict: dict[str, Any]
    tokenizer: Tokenizer
    source: str


def default_dtype() -> jnp.dtype:
    """float32 on CPU (exactness, speed of CPU matmuls), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def read_model(name_or_path: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: Any = None) -> HostModel:
    """Read weights, config and tokenizer into host memory, from whichever source is named.

    With a ``mesh``, the tensor-parallel degree is checked against the config before any
    weight is read, and a converted model's tensors are restored sharded onto the mesh in
    ``dtype`` (jax arrays instead of numpy ones).
    """
    text = str(name_or_path)
    if text in registry.KNOWN_MODELS:
        return _read_converted(text, registry.pull(text), mesh, dtype)
    path = Path(text).expanduser()
    if path.is_file():
        if not gguf.is_gguf(path):
            raise ModelNotFoundError(f"{path}: not a GGUF file (expected a .gguf file or a model directory)")
        reader, config, tokenizer = gguf.read_gguf_header(path)
        if mesh is not None:
            _plan(config, mesh)
        # dequantised tensor by tensor as the layers are built
        return HostModel(path.stem, config, gguf.gguf_tensors(reader, config, path), tokenizer, str(path))
    if path.is_dir():
        if checkpoint.is_converted(path):
            return _read_converted(path.name, path, mesh, dtype)
        if (path / "config.json").is_file():
            from engine_jax.weights import load_hf_checkpoint

            config, state = load_hf_checkpoint(path)  # memory maps: nothing read yet
            if mesh is not None:
                _plan(config, mesh)
            return HostModel(path.name, config, state, Tokenizer.from_directory(path), str(path))
        raise ModelNotFoundError(
            f"{path}: not a model directory (no config.json of a Hugging Face checkpoint, "
            f"no {checkpoint.MARKER} of a converted model)"
        )
    raise ModelNotFoundError(
        f"{text!r} is neither a known model ({', '.join(sorted(registry.KNOWN_MODELS))}) "
        f"nor an existing GGUF file or model directory"
    )


def _read_converted(name: str, directory: Path, mesh: jax.sharding.Mesh | None, dtype: Any) -> HostModel:
    placement = None
    if mesh is not None:
        plan = _plan(checkpoint.read_config(directory), mesh)
        placement = partial(plan.hf_target, dtype=dtype or default_dtype())
    # On one device, tensor by tensor as the layers are built; on a mesh, each shard onto its device.
    converted = checkpoint.open_converted(directory) if placement is None else \
        checkpoint.restore_converted(directory, placement)
    return HostModel(name, converted.config, converted.state_dict, converted.tokenizer, str(directory))


def _plan(hf_config: dict[str, Any], mesh: jax.sharding.Mesh) -> TensorParallel:
    """The sharding plan; raises ShardingError for a degree the model cannot be split by."""
    return TensorParallel(mesh, config_from_hf(hf_config))


def load_model(name_or_path: str | Path, dtype: Any = None, mesh: jax.sharding.Mesh | None = None,
               weights: str = "float") -> LoadedModel:
    """Load a model for the engine; ``dtype`` defaults to :func:`default_dtype`. With a
    ``mesh`` the weights are laid out on it for ``Engine(..., mesh=mesh)``. ``weights="int8"``
    stores the big matrices as int8 with per-channel scales (``engine_jax.quant``)."""
    started = time.perf_counter()
    dtype = dtype or default_dtype()
    host = read_model(name_or_path, mesh, dtype)
    config = config_from_hf(host.hf_config)
    if host.tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{host.source}: tokenizer has {host.tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {config.vocab_size}"
        )
    plan = TensorParallel(mesh, config) if mesh is not None else None
    params = params_from_state_dict(config, host.state_dict, dtype, plan, weights)
    return LoadedModel(
        name=host.name,
        config=config,
        params=params,
        tokenizer=host.tokenizer,
        hf_config=host.hf_config,
        source=host.source,
        load_seconds=time.perf_counter() - started,
    )
