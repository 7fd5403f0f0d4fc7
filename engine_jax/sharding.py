"""Tensor parallelism: the model's weights and the KV pool laid out over a device mesh.

One mesh axis, ``"tp"``, Megatron style: every tensor names its dimensions
with *logical* axes (``LAYER_AXES``, ``MODEL_AXES``, ``HF_AXES``,
``KV_POOL_AXES``) and ``TensorParallel.rules`` maps the logical axes that are
split onto the mesh axis (everything else is replicated). jit (GSPMD)
partitions the step from the shardings of its arguments:

* attention heads: q/k/v column-split by KV head (``w_qkv`` is grouped by KV
  head, ``engine_jax.model``), ``w_o`` row-split, so each device runs its own
  heads and one all-reduce follows ``w_o``;
* MLP: gate/up column-split, down row-split (one all-reduce);
* embeddings and LM head split over the vocabulary (when it divides; else
  replicated): the lookup is a masked local gather plus an all-reduce, the
  logits are all-gathered (``logits_sharding``) before sampling, so samplers,
  distributions, log-probs and grammar masks run on whole rows exactly as on
  one device;
* the KV pool is split over KV heads. A model with fewer KV heads than devices
  (the degree a multiple of the KV heads) repeats each KV head on
  ``degree / kv_heads`` devices, as vLLM does: the layout has ``kv_heads``
  = the degree (``layout_config``), each device holds one;
* paged attention runs per device inside ``shard_map`` (``attention``): the
  Pallas kernel on GPU/TPU, the jnp reference on CPU, each seeing only its
  heads. Page ids and the page table are the same on every device.

The degree must divide the query heads and the intermediate size, and either
divide the KV heads or be a multiple of them: ``check_degree`` says so before
anything loads.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine_jax.config import ModelConfig
from engine_jax.paged_attention import AttentionFn
from engine_jax.quant import QuantizedWeight, scale_axes

TP = "tp"

# Logical axes of the engine's tensors (engine_jax.model); fields not listed are replicated.
LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "w_qkv": ("embed", "kv_heads", None, None),
    "b_qkv": ("kv_heads", None, None),
    "w_o": ("heads", "embed"),
    "w_gate_up": ("embed", None, "mlp"),
    "w_down": ("mlp", "embed"),
}
MODEL_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
}
KV_POOL_AXES = (None, None, "kv_heads", None)  # [pages, page_size, kv_heads, head_dim]
# Hugging Face tensors ([out, in]) by the name after ``layers.{i}.`` (or after the text model's prefix).
HF_AXES: dict[str, tuple[str | None, ...]] = {
    "self_attn.q_proj.weight": ("heads", "embed"),
    "self_attn.k_proj.weight": ("hf_kv_heads", "embed"),
    "self_attn.v_proj.weight": ("hf_kv_heads", "embed"),
    "self_attn.q_proj.bias": ("heads",),
    "self_attn.k_proj.bias": ("hf_kv_heads",),
    "self_attn.v_proj.bias": ("hf_kv_heads",),
    "self_attn.o_proj.weight": ("embed", "heads"),
    "mlp.gate_proj.weight": ("mlp", "embed"),
    "mlp.up_proj.weight": ("mlp", "embed"),
    "mlp.down_proj.weight": ("embed", "mlp"),
    "embed_tokens.weight": ("vocab", "embed"),
    "lm_head.weight": ("vocab", "embed"),
}
# Where the families' text models keep their tensors (Gemma 3's multimodal checkpoints nest it);
# anything else in a checkpoint (a vision tower) is replicated if restored at all.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LAYER = re.compile(r"^layers\.\d+\.")


class ShardingError(ValueError):
    """A tensor-parallel degree the model cannot be split by (the message says which would work)."""


def valid_degrees(config: ModelConfig, limit: int | None = None) -> list[int]:
    """Every tensor-parallel degree ``check_degree`` accepts for ``config`` (up to ``limit``)."""
    top = config.num_heads if limit is None else min(limit, config.num_heads)
    return [n for n in range(1, top + 1) if _problem(config, n) is None]


def check_degree(config: ModelConfig, degree: int) -> None:
    """Raises ShardingError, naming the model's head counts and the degrees that work."""
    problem = _problem(config, degree)
    if problem is not None:
        choices = ", ".join(map(str, valid_degrees(config)))
        raise ShardingError(f"--tensor-parallel {degree}: {problem}; this model can use {choices}")


def _problem(config: ModelConfig, n: int) -> str | None:
    c = config
    if not isinstance(n, int) or n < 1:
        return "the degree must be a positive integer"
    if c.num_heads % n:
        return f"{n} does not divide the model's {c.num_heads} query heads"
    if c.num_kv_heads % n and n % c.num_kv_heads:
        return (f"the model's {c.num_kv_heads} KV heads can be neither split over {n} devices nor "
                f"repeated evenly on them")
    if c.intermediate_size % n:
        return f"{n} does not divide the model's intermediate size {c.intermediate_size}"
    return None


def layout_kv_heads(config: ModelConfig, degree: int) -> int:
    """KV heads of the engine's layout: the model's, or the degree when it is a multiple of them."""
    return max(config.num_kv_heads, degree)


def make_mesh(degree: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis ("tp") mesh over the first ``degree`` of ``devices`` (default: all of JAX's)."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= degree <= len(devices):
        raise ShardingError(f"--tensor-parallel {degree} needs {degree} devices; "
                            f"{len(devices)} {devices[0].platform if devices else ''} device(s) are available")
    return Mesh(np.array(devices[:degree]), (TP,))


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """The sharding plan of one model on one mesh (checks the degree on construction)."""

    mesh: Mesh
    config: Any  # the model's own config (any family's: num_heads, num_kv_heads, intermediate_size,
    # vocab_size; num_kv_heads as in its checkpoint)

    def __post_init__(self) -> None:
        if tuple(self.mesh.axis_names) != (TP,):
            raise ShardingError(f"the mesh must have the single axis {TP!r}, got {self.mesh.axis_names}")
        check_degree(self.config, self.degree)

    @property
    def degree(self) -> int:
        return self.mesh.size

    @property
    def kv_heads(self) -> int:
        return layout_kv_heads(self.config, self.degree)

    @property
    def layout_config(self) -> ModelConfig:
        """The config the step and the KV pool see (KV heads repeated when there are too few)."""
        return dataclasses.replace(self.config, num_kv_heads=self.kv_heads)

    @property
    def rules(self) -> dict[str, str | None]:
        """Logical axis -> mesh axis; the vocabulary is replicated when the degree does not divide it."""
        c, n = self.config, self.degree
        return {
            "heads": TP,
            "kv_heads": TP,
            "hf_kv_heads": TP if c.num_kv_heads % n == 0 else None,
            "mlp": TP,
            "vocab": TP if c.vocab_size % n == 0 else None,
        }

    def sharding(self, axes: Sequence[str | None] = ()) -> NamedSharding:
        rules = self.rules
        return NamedSharding(self.mesh, PartitionSpec(*(rules.get(a) if a else None for a in axes)))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def kv_sharding(self) -> NamedSharding:
        return self.sharding(KV_POOL_AXES)

    def param_shardings(self, params: Any) -> Any:
        """A pytree like ``params`` (model.Params, gemma3.Gemma3Params) with the NamedSharding of every weight."""
        return dataclasses.replace(params, **{
            f.name: (tuple(self.layer_shardings(lp) for lp in params.layers) if f.name == "layers"
                     else self.weight_sharding(getattr(params, f.name), MODEL_AXES.get(f.name, ())))
            for f in dataclasses.fields(params)})

    def layer_shardings(self, layer: Any) -> Any:
        """A pytree like ``layer`` (model.LayerParams, or its shapes) with each weight's NamedSharding."""
        return dataclasses.replace(layer, **{
            f.name: self.weight_sharding(getattr(layer, f.name), LAYER_AXES.get(f.name, ()))
            for f in dataclasses.fields(layer)})

    def weight_sharding(self, weight: Any, axes: Sequence[str | None]) -> Any:
        """The sharding of one weight with logical ``axes``: None for an absent one; for an int8
        weight (``engine_jax.quant``) its values like a float weight, its scales like the output axes."""
        if weight is None:
            return None
        if isinstance(weight, QuantizedWeight):
            return QuantizedWeight(self.sharding(axes), self.sharding(scale_axes(weight, axes)), weight.dtype)
        return self.sharding(axes)

    def hf_sharding(self, name: str) -> NamedSharding:
        """Where a Hugging Face tensor goes when it is read straight onto the mesh."""
        return self.sharding(HF_AXES.get(_hf_short_name(name), ()))

    def hf_target(self, name: str, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
        """What a Hugging Face tensor is read as onto the mesh: its sharding, and ``dtype`` for the
        matrices; vectors (norms, biases) stay float32 until their layer is built (a Gemma norm
        scale is 1 + weight in float32)."""
        return jax.ShapeDtypeStruct(tuple(shape), np.float32 if len(shape) == 1 else dtype,
                                    sharding=self.hf_sharding(name))

    def place_params(self, params: Any) -> Any:
        """``params`` on the mesh (a no-op for weights already there)."""
        if params.layers and params.layers[0].w_qkv.shape[1] != self.kv_heads:
            raise ShardingError(
                f"the weights have {params.layers[0].w_qkv.shape[1]} KV heads; tensor parallelism over "
                f"{self.degree} devices lays them out with {self.kv_heads}: load the model for the mesh "
                f"(engine_jax.loader.load_model(..., mesh=mesh))")
        return jax.device_put(params, self.param_shardings(params))

    def attention(self, fn: AttentionFn) -> AttentionFn:
        """``fn`` run per device over its own heads (shard_map); same signature."""
        return _sharded_attention(fn, self.mesh)

    def gather_logits(self, logits: jax.Array) -> jax.Array:
        """Inside the step: the LM head's output, split over the vocabulary, gathered into whole
        rows on every device (the first constraint keeps GSPMD from gathering the head's weights
        instead)."""
        logits = jax.lax.with_sharding_constraint(logits, self.sharding((None, "vocab")))
        return jax.lax.with_sharding_constraint(logits, self.replicated)


def _hf_short_name(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight``; ``model.embed_tokens.weight``
    -> ``embed_tokens.weight`` (also under Gemma 3's multimodal prefixes)."""
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            return _LAYER.sub("", name[len(prefix):])
    return name


@functools.lru_cache(maxsize=None)
def _sharded_attention(fn: AttentionFn, mesh: Mesh) -> AttentionFn:
    # Cached: the attention function is a static jit argument, so one object per (fn, mesh).
    return functools.partial(_per_shard_attention, fn=fn, mesh=mesh)


def _per_shard_attention(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, custom_mask,
                         *, scale: float, fn: AttentionFn, mesh: Mesh, window: int | None = None,
                         q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None) -> jax.Array:
    heads, pool, whole = PartitionSpec(None, TP, None), PartitionSpec(None, None, TP, None), PartitionSpec()
    # Optional inputs, each whole on every device: the mask, the window's positions (Gemma 3).
    optional = {"custom_mask": custom_mask, "q_positions": q_positions, "kv_positions": kv_positions}
    given = [name for name, value in optional.items() if value is not None]

    def local(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, *extra):
        kw = {**dict.fromkeys(optional), **dict(zip(given, extra))}
        window_kw = {} if window is None else dict(window=window, q_positions=kw["q_positions"],
                                                     kv_positions=kw["kv_positions"])
        return fn(q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, kw["custom_mask"],
                  scale=scale, **window_kw)

    args = (q, k_pages, v_pages, slot_valid, page_table, kv_lens, cu_q_lens, q_slots, *(optional[n] for n in given))
    specs = (heads, pool, pool) + (whole,) * (5 + len(given))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)
