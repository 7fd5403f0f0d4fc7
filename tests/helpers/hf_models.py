"""Small random Hugging Face decoder checkpoints with a real byte-level BPE tokenizer.

Each family exercises one architecture feature the engine must match:

* ``llama``   - Llama 3 RoPE scaling (rope_type "llama3") and tied word embeddings
* ``qwen2``   - biases on the q/k/v projections
* ``qwen3``   - q/k RMSNorm and an explicit head_dim different from hidden/heads
* ``mistral`` - plain Mistral (untied head, grouped-query attention)
* ``gemma3``  - Gemma 3: local (sliding-window, window 6) and global layers with their own RoPE
  bases (linear scaling on the global ones), q/k norms, four norms per block, GeGLU,
  query_pre_attn_scalar != head_dim, final logit softcapping, tied embeddings

Weights are drawn with a larger spread than transformers' default init, and
norm weights and biases are randomised too, so logits are far from uniform
and a wrongly loaded tensor cannot hide behind an all-ones default.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 384

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # the Llama-architecture families (engine_jax.model)
ALL_FAMILIES = FAMILIES + ("gemma3",)
GEMMA3_WINDOW = 6  # shorter than the test sequences

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.08,
)


def family_config(family: str, vocab_size: int):
    """The transformers config object of a test family."""
    import transformers

    eos = vocab_size - len(SPECIAL_TOKENS)  # <|endoftext|>
    ids = dict(bos_token_id=None, eos_token_id=eos, pad_token_id=None)
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size, tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            **_COMMON, **ids)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False,
                                        rope_theta=1000000.0, **_COMMON, **ids)
    if family == "qwen3":
        return transformers.Qwen3Config(vocab_size=vocab_size, tie_word_embeddings=False, head_dim=24,
                                        rope_theta=1000000.0, **_COMMON, **ids)
    if family == "mistral":
        return transformers.MistralConfig(vocab_size=vocab_size, tie_word_embeddings=False,
                                          sliding_window=None, **_COMMON, **ids)
    if family == "gemma3":
        common = {**_COMMON, "num_hidden_layers": 3}
        return transformers.Gemma3TextConfig(
            vocab_size=vocab_size, tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=GEMMA3_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}},
            **common, **ids)
    raise ValueError(f"unknown test family {family!r}; choose one of {ALL_FAMILIES}")


def training_text() -> list[str]:
    """Docstrings of a few standard-library modules: local, deterministic English-and-code text."""
    import collections
    import functools
    import itertools
    import json as json_module
    import pathlib
    import textwrap

    texts = []
    for module in (collections, functools, itertools, json_module, pathlib, textwrap):
        texts.append(inspect.getdoc(module) or "")
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name, None))
            if doc and not name.startswith("_"):
                texts.append(doc)
    return texts


def build_tokenizer(directory: Path, vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """Trains a byte-level BPE on stdlib docstrings and saves it with a ChatML template.

    Returns the transformers ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(directory))
    _ensure_template_in_config(directory)
    return fast


def _ensure_template_in_config(directory: Path) -> None:
    """transformers 5 writes the template to chat_template.jinja; keep it in tokenizer_config.json too."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("chat_template") != CHATML_TEMPLATE:
        config["chat_template"] = CHATML_TEMPLATE
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def build_model_dir(family: str, directory: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Writes a random float32 ``family`` checkpoint plus tokenizer into ``directory`` and returns it."""
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    vocab_size = len(tokenizer)
    config = family_config(family, vocab_size)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(config.initializer_range * torch.randn_like(param))
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def load_hf_model(directory: Path):
    """transformers' own float32 load of a test checkpoint, in eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
