"""The tokenizer against transformers' GGUF tokenizer, plus save/load and error cases."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_jax.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

TRICKY = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "The capital of France is",
    "  multiple   spaces\n\n\ttabs\r\n and\u00a0nbsp",
    "日本語のテキスト、中文，한국어",
    "emoji 🤖🎉👩‍👩‍👧‍👦 flags 🇫🇷 and ZWJ",
    "I'm don't WE'LL they've 12345 3.14159 1,000,000",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "half special <|im_start and <|im_end|",
    "code:\n    def f(x):\n        return x**2  # comment\n",
    "\x00\x01 control \x7f chars \ufeff bom",
    "combining e\u0301 vs \u00e9, ligature \ufb01",
    "🚀" * 20,
    "a" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with émoji 🎨"},
    ],
]


@pytest.fixture(scope="session")
def tok(smollm) -> Tokenizer:
    return smollm.tokenizer


@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_transformers(tok, hf_gguf_tokenizer, text):
    assert tok.encode(text) == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_gguf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_matches_transformers_and_round_trips(tok, hf_gguf_tokenizer, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_gguf_tokenizer.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)


_specials = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"])
_text = st.lists(st.one_of(st.text(max_size=40), _specials), max_size=6).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_text)
def test_encode_matches_transformers_on_generated_text(tok, hf_gguf_tokenizer, text):
    ids = tok.encode(text)
    assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    # SmolLM2's vocabulary lacks a few byte tokens (e.g. 0x16); BPE drops those bytes
    single_bytes = {v for v in tok.vocabulary() if len(v) == 1}
    if all(bytes([b]) in single_bytes for b in text.encode("utf-8")):
        assert tok.decode(ids) == text
    else:
        assert tok.decode(ids) == hf_gguf_tokenizer.decode(ids)


def test_special_tokens_and_ids(tok, hf_gguf_tokenizer):
    specials = tok.special_tokens()
    assert specials["<|im_start|>"] == 1 and specials["<|im_end|>"] == 2 and specials["<|endoftext|>"] == 0
    assert set(hf_gguf_tokenizer.all_special_tokens) <= set(specials)
    assert tok.bos_token_id == hf_gguf_tokenizer.bos_token_id
    assert tok.eos_token_ids == [hf_gguf_tokenizer.eos_token_id]
    assert tok.vocab_size == len(hf_gguf_tokenizer)


def test_vocabulary_bytes(tok, hf_gguf_tokenizer):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tok.vocabulary()
    assert len(vocab) == tok.vocab_size
    specials = set(tok.special_tokens().values())
    for i, token in enumerate(hf_gguf_tokenizer.convert_ids_to_tokens(list(range(tok.vocab_size)))):
        expected = token.encode() if i in specials else bytes(to_byte[c] for c in token)
        assert vocab[i] == expected, i
    assert vocab[tok.encode(" the")[0]] == b" the"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=30))
def test_vocabulary_bytes_decode_like_decode(tok, ids):
    joined = b"".join(tok.vocabulary()[i] for i in ids)
    assert joined.decode("utf-8", errors="replace") == tok.decode(ids)
    stream = IncrementalDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_incremental_decoder_holds_back_partial_characters(tok):
    ids = tok.encode("日本語 🤖")
    stream = IncrementalDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "日本語 🤖" and stream.flush() == ""
    assert all("\ufffd" not in p for p in pieces)
    skipping = IncrementalDecoder(tok, skip_special_tokens=True)
    assert "".join(skipping.push(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


@pytest.mark.parametrize("bad", [49152, -1, 10**9])
def test_decode_rejects_ids_outside_vocab(tok, bad):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, bad])


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_gguf_tokenizer, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_gguf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")


def test_chat_template_raise_exception_and_missing_template(tmp_path):
    import jinja2

    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    strict = Tokenizer(backend, {"chat_template": "{{ raise_exception('no ' + messages[0]['role']) }}"})
    with pytest.raises(jinja2.exceptions.TemplateError, match="no user"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(backend, {}).apply_chat_template([{"role": "user", "content": "x"}])


def test_save_and_reload(tok, hf_gguf_tokenizer, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    again = Tokenizer.from_directory(tmp_path)
    for text in TRICKY:
        assert again.encode(text) == tok.encode(text)
    assert again.chat_template == tok.chat_template
    assert again.eos_token_ids == tok.eos_token_ids and again.bos_token_id == tok.bos_token_id
    assert again.special_tokens() == tok.special_tokens()
    assert again.vocabulary() == tok.vocabulary()
    # the files are a valid Hugging Face tokenizer directory too
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TRICKY:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(CONVERSATIONS[1])
    )


def test_from_directory_reads_transformers_save(hf_gguf_tokenizer, tmp_path):
    hf_gguf_tokenizer.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_directory(tmp_path)
    assert tok.chat_template == hf_gguf_tokenizer.chat_template
    assert tok.eos_token_ids == [2, 0]
    assert tok.encode("Hello <|im_end|>") == hf_gguf_tokenizer.encode("Hello <|im_end|>", add_special_tokens=False)


def test_missing_or_broken_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        Tokenizer.from_directory(tmp_path)


def test_tiny_gguf_tokenizer_applies_merges_and_control_tokens(tiny_gguf):
    import gguf

    path, _ = tiny_gguf
    tok = Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(path)))
    tokens = [tok.backend.id_to_token(i) for i in tok.encode(" the<|end|>")]
    assert tokens == ["Ġthe", "<|end|>"]
    assert tok.eos_token_ids == [tok.encode("<|end|>")[0]]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|start|>user\nhi<|end|>\n"


def test_gguf_without_byte_level_tokenizer_is_rejected(tiny, tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "a"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf_metadata(gguf.GGUFReader(str(tmp_path / "sp.gguf")))
