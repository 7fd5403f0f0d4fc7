"""Weight-only int8: the big matrices stored as int8 with one float32 scale per output channel.

``--weights int8`` (``engine_jax.options``) quantises, at load time (``engine_jax.families``),
every layer's projections (``QUANTIZED_LAYER_FIELDS``: fused q/k/v, o, fused gate/up, down) and
the embedding / LM head (a scale per vocabulary row),
symmetrically: ``w ~= values * scale`` with ``values = round(w / scale)`` in [-127, 127] and
``scale = max|w| / 127`` over the input (contracted) dimensions of each output channel. Weights
take a quarter of their float32 bytes (half of bfloat16's) plus one scale per channel.

Activations stay in the model's dtype. A dot converts the int8 values to it and scales the
*output* (a per-output-channel scale commutes with the contraction): inside the jitted step XLA
fuses the convert into the dot's operand on GPU/TPU, so the weights are read from memory as int8.
XLA:CPU handles a convert feeding a dot badly (``_blocked_dots``), so on one CPU device the
dots run over blocks of output columns; even so the option saves memory there, not time
(benchmarks/RESULTS.md).

A scale keeps its weight's rank with the input dimensions collapsed to 1 (``[1, out...]`` for a
``[in, out...]`` projection, ``[vocab, 1]`` for the embedding), so it broadcasts against the
dot's output as it is, and ``engine_jax.sharding`` splits it exactly like the weight's output
dimensions (``scale_axes``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZED_LAYER_FIELDS = ("w_qkv", "w_o", "w_gate_up", "w_down")  # [in, out...] in both families
_QMAX = 127.0
_CHUNK_BYTES = 64 * 1024 * 1024  # host arrays larger than this are quantised in slices
_BLOCK_BYTES = 1024 * 1024  # converted weight per block of an int8 dot on CPU (_blocked_dots)


@dataclass(frozen=True)
class QuantizedWeight:
    """An int8 weight and its per-output-channel scales, standing in for a ``dtype`` matrix."""

    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape with the input dimensions 1
    dtype: Any  # the activations' dtype (what the weight stands in for); static

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def T(self) -> "QuantizedWeight":  # noqa: N802 (as an array's)
        """The transposed weight (its scales transposed with it)."""
        return QuantizedWeight(self.values.T, self.scale.T, self.dtype)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["values", "scale"], meta_fields=["dtype"])


def quantize(weight: Any, input_axes: Sequence[int], dtype: Any = None) -> QuantizedWeight:
    """``weight`` as int8 with a symmetric scale per output channel (``input_axes`` are the
    contracted ones); ``dtype`` (default the weight's) is what the dots compute in. numpy or
    jax in (also inside jit), jax out."""
    input_axes, dtype = tuple(input_axes), jnp.dtype(dtype or weight.dtype)
    if isinstance(weight, np.ndarray) and weight.nbytes > _CHUNK_BYTES:
        # A large host array (Gemma 3's 262k-token embedding) goes to the device a slice of
        # output channels at a time: no float copy of it beside the source.
        axis = next(a for a in range(weight.ndim) if a not in input_axes)
        step = max(1, weight.shape[axis] * _CHUNK_BYTES // weight.nbytes)
        parts = [_quantize(np.take(weight, np.arange(i, min(i + step, weight.shape[axis])), axis=axis),
                           input_axes, dtype) for i in range(0, weight.shape[axis], step)]
        return QuantizedWeight(values=jnp.concatenate([p.values for p in parts], axis=axis),
                               scale=jnp.concatenate([p.scale for p in parts], axis=axis), dtype=dtype)
    return _quantize(weight, input_axes, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(weight: Any, input_axes: tuple[int, ...], dtype: Any) -> QuantizedWeight:
    # jitted: one fused pass, no full-size temporaries (a large embedding is quantised on load)
    w = weight.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=input_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / _QMAX, 1.0)
    values = jnp.clip(jnp.round(w / scale), -_QMAX, _QMAX).astype(jnp.int8)
    return QuantizedWeight(values=values, scale=scale, dtype=dtype)


def dequantize(weight: QuantizedWeight) -> jax.Array:
    """The float matrix a quantised weight stands for (for tests and error estimates)."""
    return (weight.values.astype(jnp.float32) * weight.scale).astype(weight.dtype)


def quantize_layer(layer: Any) -> Any:
    """A layer params dataclass with its projections (``QUANTIZED_LAYER_FIELDS``, ``[in, out...]``) int8."""
    return dataclasses.replace(layer, **{name: quantize(getattr(layer, name), (0,))
                                         for name in QUANTIZED_LAYER_FIELDS})


def einsum(subscripts: str, x: jax.Array, weight: Any) -> jax.Array:
    """``jnp.einsum(subscripts, x, weight)`` for ``x [T, in]`` and ``weight [in, out...]``, float or
    quantised (a projection: the output is ``[T, out...]``)."""
    if not isinstance(weight, QuantizedWeight):
        return jnp.einsum(subscripts, x, weight)
    if _blocked_dots():
        return matmul(x, weight)
    out = jnp.einsum(subscripts, x, weight.values.astype(x.dtype))
    return (out * weight.scale.reshape(weight.scale.shape[1:])).astype(x.dtype)


def matmul(x: jax.Array, weight: Any) -> jax.Array:
    """``x [T, in] @ weight [in, out...]`` (output ``[T, out...]``) for a float or quantised weight."""
    if not isinstance(weight, QuantizedWeight):
        return x @ weight
    if _blocked_dots():
        return _blocked_matmul(x, weight)
    return ((x @ weight.values.astype(x.dtype)) * weight.scale).astype(x.dtype)


def _blocked_dots() -> bool:
    """Whether to multiply by int8 weights a block of output columns at a time: on one CPU device.

    XLA:CPU either fuses the int8->float convert into the dot as a slow naive loop (~15x slower
    than float32 on SmolLM2's [576, 49152] head) or materialises each converted weight in its
    own slice of the step's temporary memory, which is freshly mapped on every run: a step of
    SmolLM2 then page-faults through ~400 MB (~10x slower than float32). Converting a ~1 MiB
    block of columns at a time in a loop reuses one small buffer (benchmarks/RESULTS.md). Not
    where weights may be sharded (a loop over a split dimension would make GSPMD gather it), and
    not on GPU/TPU, where the convert fuses into the dot.
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _blocked_matmul(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """``x [T, in]`` times a quantised ``[in, out...]`` weight, ~``_BLOCK_BYTES`` of converted columns at a time."""
    values = weight.values.reshape(weight.values.shape[0], -1)
    scale = weight.scale.reshape(1, -1)
    rows, columns = values.shape
    least = -(-rows * columns * jnp.dtype(x.dtype).itemsize // _BLOCK_BYTES)
    blocks = next(n for n in range(max(1, least), columns + 1) if columns % n == 0)
    width = columns // blocks

    def block(i: jax.Array, out: jax.Array) -> jax.Array:
        part = jax.lax.dynamic_slice_in_dim(values, i * width, width, axis=1).astype(x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, x @ part, i * width, axis=1)

    out = jax.lax.fori_loop(0, blocks, block, jnp.zeros((x.shape[0], columns), x.dtype))
    return (out * scale).astype(x.dtype).reshape((x.shape[0],) + weight.values.shape[1:])


def matmul_transposed(x: jax.Array, weight: Any) -> jax.Array:
    """``x @ weight.T`` for ``weight`` [out, in] (a tied embedding as the LM head)."""
    if not isinstance(weight, QuantizedWeight):
        return x @ weight.T
    return ((x @ weight.values.T.astype(x.dtype)) * weight.scale.T).astype(x.dtype)


def take_rows(weight: Any, rows: jax.Array) -> jax.Array:
    """``weight[rows]`` (an embedding lookup), in the weight's stand-in dtype."""
    if not isinstance(weight, QuantizedWeight):
        return weight[rows]
    return (weight.values[rows].astype(jnp.float32) * weight.scale[rows]).astype(weight.dtype)


def transposed_copy(weight: Any) -> Any:
    """A contiguous transposed copy of a 2-D weight (float or quantised)."""
    if not isinstance(weight, QuantizedWeight):
        return jnp.transpose(weight).copy()
    return QuantizedWeight(jnp.transpose(weight.values).copy(), jnp.transpose(weight.scale), weight.dtype)


def scale_axes(weight: QuantizedWeight, axes: Sequence[str | None]) -> tuple[str | None, ...]:
    """The logical axes of ``weight.scale`` given the weight's: the output ones, None where collapsed."""
    if not axes:
        return ()
    return tuple(a if s == v else None for a, s, v in zip(axes, weight.scale.shape, weight.values.shape))


def weight_bytes(params: Any) -> int:
    """Bytes of every array in a params tree (int8 values and their scales counted as stored)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(params))
