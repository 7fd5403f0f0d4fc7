"""Our readers on the shared tiny Hugging Face checkpoints (tests/helpers/hf_models.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine_jax.loader import load_model
from engine_jax.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello world",
    " leading space and  double  spaces\n\nnew paragraphs\t tabs",
    "unicode: héllo wörld 日本 🤖",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tokenizer_from_directory_matches_transformers(small_model_dir, family):
    transformers = pytest.importorskip("transformers")
    directory = small_model_dir(family)
    ours = Tokenizer.from_directory(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)
        stream = IncrementalDecoder(ours)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_token_ids[0] == theirs.eos_token_id
    assert ours.vocab_size == len(theirs)


def test_load_model_equals_the_engine_test_loader(tiny_llama_dir, tiny_llama_model):
    ours = load_model(str(tiny_llama_dir))
    assert ours.config == tiny_llama_model.config
    for a, b in zip(jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(tiny_llama_model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
