"""Model families: from a Hugging Face config dict to the config, params and forward step that run it.

The engine and the loaders ask this module instead of importing one model module, so a family
is one module (``engine_jax.model`` for Llama/Qwen/Mistral, ``engine_jax.gemma3``) plus a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine_jax import gemma3, model
from engine_jax.config import ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_type: type
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    params_from_state_dict: Callable[..., Any]
    forward: Callable[..., Any]  # (params, cache, batch, inv_freq, *, config, attention) -> (cache, logits)
    rope_inv_freq: Callable[[Any], Any]
    # The KV pool records each slot's position (attention windows by position need it).
    slot_positions: bool
    # A window over trailing slots applied to every layer through the step's mask (Mistral), or None.
    mask_window: Callable[[Any], int | None]


LLAMA = Family(
    name="llama", config_type=ModelConfig, config_from_hf=ModelConfig.from_hf,
    params_from_state_dict=model.params_from_state_dict, forward=model.forward,
    rope_inv_freq=model.rope_inv_freq, slot_positions=False, mask_window=lambda c: c.sliding_window,
)
GEMMA3 = Family(
    name="gemma3", config_type=gemma3.Gemma3Config, config_from_hf=gemma3.Gemma3Config.from_hf,
    params_from_state_dict=gemma3.params_from_state_dict, forward=gemma3.forward,
    rope_inv_freq=gemma3.rope_inv_freq, slot_positions=True, mask_window=lambda c: None,
)
FAMILIES = (LLAMA, GEMMA3)


def family_of(config: Any) -> Family:
    """The family of a model config object."""
    for family in FAMILIES:
        if isinstance(config, family.config_type):
            return family
    raise TypeError(f"no model family for config type {type(config).__name__}")


def config_from_hf(hf_config: Mapping[str, Any]) -> Any:
    """The engine config of a Hugging Face config.json dict (a ValueError names what is unsupported)."""
    family = GEMMA3 if gemma3.is_gemma3(hf_config) else LLAMA
    return family.config_from_hf(hf_config)


def params_from_state_dict(config: Any, state_dict: Mapping[str, Any], dtype: Any) -> Any:
    """The engine params of an HF-named state dict, for the family of ``config``."""
    return family_of(config).params_from_state_dict(config, state_dict, dtype)
