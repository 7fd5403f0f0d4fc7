"""The model's static description, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")

_ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}

# RoPE variants whose frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# How the engine stores weights (--weights): the model's dtype, or int8 with scales (engine_jax.quant).
WEIGHT_FORMATS = ("float", "int8")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder. Frozen and hashable: it is a jit static argument."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Sorted (key, value) pairs of the HF rope parameters other than rope_theta, or None for plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral: attend to at most this many trailing slots
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling) if self.rope_scaling else {}

    @classmethod
    def from_hf(cls, config_dict: Mapping[str, Any]) -> "ModelConfig":
        """Maps a Hugging Face ``config.json`` (as a dict) onto a ModelConfig."""
        architecture = _architecture_of(config_dict)
        get = config_dict.get
        if get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {get('hidden_act')!r}; only silu is implemented")
        if get("mlp_bias", False):
            raise ValueError("mlp_bias=true is not supported")
        if architecture in ("qwen2", "qwen3") and get("use_sliding_window", False):
            raise ValueError(f"{architecture} with use_sliding_window=true is not supported")
        try:
            hidden_size = int(config_dict["hidden_size"])
            num_heads = int(config_dict["num_attention_heads"])
            rope_theta, rope_scaling = _rope_of(config_dict)
            eos = get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (
                (int(eos),) if eos is not None else ())
            return cls(
                architecture=architecture,
                vocab_size=int(config_dict["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(config_dict["intermediate_size"]),
                num_layers=int(config_dict["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(get("num_key_value_heads") or num_heads),
                head_dim=int(get("head_dim") or hidden_size // num_heads),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                attention_bias=architecture == "qwen2" or bool(get("attention_bias", False)),
                qk_norm=architecture == "qwen3",
                sliding_window=int(get("sliding_window")) if architecture == "mistral" and get("sliding_window") else None,
                bos_token_id=int(get("bos_token_id")) if get("bos_token_id") is not None else None,
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ValueError(f"config.json for {architecture} is missing the field {exc.args[0]!r}") from exc


def _architecture_of(config_dict: Mapping[str, Any]) -> str:
    model_type = config_dict.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    for cls_name in config_dict.get("architectures") or ():
        if cls_name in _ARCHITECTURE_CLASSES:
            return _ARCHITECTURE_CLASSES[cls_name]
    named = model_type or ", ".join(config_dict.get("architectures") or ()) or "<none given>"
    raise ValueError(
        f"unsupported model architecture {named!r}; supported model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_of(config_dict: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """RoPE theta and scaling from either transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)."""
    params = dict(config_dict.get("rope_parameters") or {})
    scaling = config_dict.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = float(params.pop("rope_theta", config_dict.get("rope_theta", 10000.0)))
    # transformers 4 spelled rope_type as "type".
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    if params.get("rope_type", "default") == "default":
        params.pop("rope_type", None)
    if not params:
        return theta, None
    return theta, tuple(sorted((k, _hashable(v)) for k, v in params.items()))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
