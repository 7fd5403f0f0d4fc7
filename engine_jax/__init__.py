"""The Pie model engine in JAX: Llama-family and Gemma 3 decoders over a paged KV pool.

The main entry points::

    from engine_jax import Engine, ForwardRequest, Sample, generate

``Engine.step`` runs one batched forward over many ``ForwardRequest``s
(see ``engine_jax.batch`` for the record semantics); ``generate`` is the
plain native generation loop on top of it.
"""

from engine_jax.batch import (
    Distribution,
    EngineInputError,
    ForwardRequest,
    Logprobs,
    OutputRequest,
    OutputResult,
    Sample,
)
from engine_jax.config import ModelConfig
from engine_jax.engine import Engine
from engine_jax.gemma3 import Gemma3Config
from engine_jax.generate import generate
from engine_jax.kv_cache import OutOfPages, PagePool

__all__ = [
    "Distribution",
    "Engine",
    "EngineInputError",
    "ForwardRequest",
    "Gemma3Config",
    "Logprobs",
    "ModelConfig",
    "OutOfPages",
    "OutputRequest",
    "OutputResult",
    "PagePool",
    "Sample",
    "generate",
]
