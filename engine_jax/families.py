"""Model families: from a Hugging Face config dict to the config, params and forward step that run it.

The engine and the loaders ask this module instead of importing one model module, so a family
is one module (``engine_jax.model`` for Llama/Qwen/Mistral, ``engine_jax.gemma3``) plus a row here.
Every family builds its weights the same way (``params_from_state_dict``): ``hf_names`` finds and
checks the Hugging Face tensors, ``layer_from_hf`` lays out one layer (numpy on the host, or jax
arrays inside a jit on a tensor-parallel mesh), ``params_from_hf`` assembles the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from engine_jax import gemma3, model, quant
from engine_jax.config import WEIGHT_FORMATS, ModelConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_type: type
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    hf_names: Callable[[Any, Mapping[str, Any]], model.HFNames]  # (config, state_dict), checked
    layer_from_hf: Callable[..., Any]  # (config, {short name: tensor}, kv_heads, dtype) -> layer params
    params_from_hf: Callable[..., Any]  # (config, embed, final_norm, lm_head | None, layers, dtype) -> params
    forward: Callable[..., Any]  # (params, cache, batch, inv_freq, *, config, attention) -> (cache, logits)
    rope_inv_freq: Callable[[Any], Any]
    # The KV pool records each slot's position (attention windows by position need it).
    slot_positions: bool
    # A window over trailing slots applied to every layer through the step's mask (Mistral), or None.
    mask_window: Callable[[Any], int | None]


LLAMA = Family(
    name="llama", config_type=ModelConfig, config_from_hf=ModelConfig.from_hf, hf_names=model.hf_names,
    layer_from_hf=model.layer_from_hf, params_from_hf=model.params_from_hf, forward=model.forward,
    rope_inv_freq=model.rope_inv_freq, slot_positions=False, mask_window=lambda c: c.sliding_window,
)
GEMMA3 = Family(
    name="gemma3", config_type=gemma3.Gemma3Config, config_from_hf=gemma3.Gemma3Config.from_hf,
    hf_names=gemma3.hf_names, layer_from_hf=gemma3.layer_from_hf, params_from_hf=gemma3.params_from_hf,
    forward=gemma3.forward, rope_inv_freq=gemma3.rope_inv_freq, slot_positions=True, mask_window=lambda c: None,
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


def params_from_state_dict(config: Any, state_dict: Mapping[str, Any], dtype: Any, plan: Any = None,
                           weights: str = "float") -> Any:
    """The engine params of an HF-named state dict, for the family of ``config``, in ``dtype``;
    ``weights="int8"`` stores the projections, embedding and LM head as int8 with per-channel
    scales (``engine_jax.quant``), quantised layer by layer as they are built.

    Without ``plan`` the tensors are numpy arrays (or memory maps) and the params go to the
    default device. With a ``plan`` (``engine_jax.sharding.TensorParallel``) they are laid out
    on its mesh with no whole copy of the model on the host: a numpy tensor is read one
    device's slice at a time (``plan.hf_target``), a jax array already placed that way (a
    restored checkpoint) stays where it is, and each layer is built by a jit whose inputs and
    outputs live on the same devices.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    family = family_of(config)
    names = family.hf_names(config, state_dict)
    dtype = jnp.dtype(dtype)
    finish = quant.quantize_layer if weights == "int8" else (lambda built: built)
    if plan is None:
        def tensor(name: str) -> Any:
            return np.asarray(state_dict[name])  # a lazy tensor (engine_jax.gguf) is read here

        def build(hf: dict[str, Any]) -> Any:
            return finish(jax.tree.map(jnp.asarray, family.layer_from_hf(config, hf, config.num_kv_heads, dtype)))
    else:
        def tensor(name: str) -> Any:
            return _on_mesh(plan, name, state_dict[name], dtype)

        def layer(hf: dict[str, Any]) -> Any:
            return finish(family.layer_from_hf(config, hf, plan.kv_heads, dtype))

        first = {short: tensor(name) for short, name in names.layer_names(0).items()}
        build = jax.jit(layer, out_shardings=plan.layer_shardings(jax.eval_shape(layer, first)))
    def top_tensor(name: str) -> Any:
        array = tensor(name)
        if weights == "int8" and name != names.final_norm:  # [vocab, hidden]: a scale per vocabulary row
            return quant.quantize(array, (1,), dtype)
        return array if plan is not None else jnp.asarray(array)

    # The embedding (and LM head) first, stored as they will be before the layers are built: the
    # largest tensors' read transients (Gemma 3's 640 MiB embedding) then do not come on top of the
    # layers' memory, and no float copy of them waits for the end.
    top = {name: top_tensor(name) for name in (names.embed, names.lm_head, names.final_norm) if name is not None}
    layers = tuple(build({short: tensor(name) for short, name in names.layer_names(i).items()})
                   for i in range(config.num_layers))
    lm_head = None if names.lm_head is None else top[names.lm_head]
    params = family.params_from_hf(config, top[names.embed], top[names.final_norm], lm_head, layers, dtype)
    if plan is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, plan.param_shardings(params))


def _on_mesh(plan: Any, name: str, array: Any, dtype: Any) -> jax.Array:
    if isinstance(array, jax.Array):
        return array
    target = plan.hf_target(name, array.shape, dtype)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: np.asarray(array[index]).astype(target.dtype))
