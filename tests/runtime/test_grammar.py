"""pie_runtime/grammar.py: the host's grammar matchers, checked against llguidance itself.

The oracle is llguidance driven the way its own documentation shows (its
Hugging Face tokenizer bridge over transformers' tokenizer, its numpy
bitmask helpers); the host builds its tokenizer from our engine tokenizer
and hands masks out as BRLE. Both must allow exactly the same tokens at
every step of a walk through the grammar.
"""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pie_runtime.errors import PieError
from pie_runtime.grammar import JSON_DEFAULTS, GrammarMatcher, brle_of
from pie_runtime.host.conversions import decode_brle, encode_brle

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
REGEX = "[0-9]{3}-[a-z]{2}"
EBNF = 'root ::= "yes" | "no" | "maybe " [0-9]'


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    from engine_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_directory(tiny_llama_dir)
    return SimpleNamespace(tokenizer=tok, vocab_size=tok.vocab_size,
                           engine=SimpleNamespace(config=SimpleNamespace(eos_token_ids=[])))


@pytest.fixture(scope="module")
def oracle_tokenizer(tiny_llama_dir):
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    return llguidance.hf.from_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(tiny_llama_dir)))


def _oracle_mask(matcher, vocab: int) -> np.ndarray:
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    bitmask = allocate_token_bitmask(1, vocab)
    fill_next_token_bitmask(matcher, bitmask)
    words = bitmask[0].view(np.uint32)
    return ((words[np.arange(vocab) // 32] >> (np.arange(vocab) % 32)) & 1).astype(bool)


def _make(served, kind: str):
    return {"json": lambda: GrammarMatcher.json_schema(served, json.dumps(SCHEMA)),
            "regex": lambda: GrammarMatcher.regex(served, REGEX),
            "ebnf": lambda: GrammarMatcher.ebnf(served, EBNF)}[kind]()


def _oracle(oracle_tokenizer, kind: str):
    import llguidance

    # The same JSON layout the host asks for (its documented defaults).
    grammar = {"json": lambda: llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                                             defaults=JSON_DEFAULTS),
               "regex": lambda: llguidance.LLMatcher.grammar_from_regex(REGEX),
               "ebnf": lambda: llguidance.grammar_from("ebnf", EBNF)}[kind]()
    return llguidance.LLMatcher(oracle_tokenizer, grammar, log_level=0)


@pytest.mark.parametrize("kind", ["json", "regex", "ebnf"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allowed_tokens_match_llguidance_along_a_random_walk(served, oracle_tokenizer, kind, seed):
    ours, theirs = _make(served, kind), _oracle(oracle_tokenizer, kind)
    vocab = served.vocab_size
    eos = served.tokenizer.eos_token_ids
    rng = random.Random(seed)
    walked: list[int] = []
    for _ in range(64):
        mask = decode_brle(ours.allowed_tokens(), vocab, "allowed")
        np.testing.assert_array_equal(mask, _oracle_mask(theirs, vocab), err_msg=f"after {walked}")
        assert ours.is_done() == theirs.is_stopped() and ours.is_accepting() == theirs.is_accepting()
        if ours.is_done():
            break
        choices = [t for t in np.flatnonzero(mask).tolist() if t not in eos]
        assert choices, f"nothing but EOS allowed before the match is done, after {walked}"
        token = rng.choice(choices)
        ours.accept([token])
        assert theirs.consume_token(token)
        walked.append(token)
    assert ours.is_done(), walked
    text = served.tokenizer.decode(walked)
    if kind == "json":
        assert text in ('{"ok": true}', '{"ok": false}')
    elif kind == "regex":
        assert re.fullmatch(REGEX, text)
    else:
        assert re.fullmatch(r"yes|no|maybe [0-9]", text)
    # Done: only EOS may follow, and it is accepted.
    assert set(np.flatnonzero(decode_brle(ours.allowed_tokens(), vocab, "allowed")).tolist()) == set(eos)
    ours.accept(eos[:1])


def test_a_forbidden_token_is_an_error_and_consumes_nothing(served):
    matcher = GrammarMatcher.regex(served, REGEX)
    before = matcher.allowed_tokens()
    forbidden = served.tokenizer.encode("x")
    allowed_digit = served.tokenizer.encode("1")
    with pytest.raises(PieError) as err:
        matcher.accept(forbidden)
    assert err.value.code == "invalid-argument" and "not allowed" in err.value.message
    # All or nothing: a good token followed by a bad one consumes neither.
    with pytest.raises(PieError):
        matcher.accept(allowed_digit + forbidden)
    assert matcher.allowed_tokens() == before
    matcher.accept(allowed_digit)  # still usable
    with pytest.raises(PieError) as err:
        matcher.accept([served.vocab_size])
    assert err.value.code == "invalid-argument"


def test_eos_is_allowed_only_where_the_grammar_may_end(served):
    eos = served.tokenizer.eos_token_ids[0]
    matcher = GrammarMatcher.regex(served, "[a-c]+")
    with pytest.raises(PieError):
        matcher.accept([eos])
    matcher.accept(served.tokenizer.encode("ab"))
    assert matcher.is_accepting() and not matcher.is_done()
    assert decode_brle(matcher.allowed_tokens(), served.vocab_size, "allowed")[eos]
    matcher.accept([eos])
    assert matcher.is_done()


def test_rollback_and_reset(served):
    matcher = GrammarMatcher.regex(served, REGEX)
    start = matcher.allowed_tokens()
    matcher.accept(served.tokenizer.encode("1"))
    after_one = matcher.allowed_tokens()
    matcher.accept(served.tokenizer.encode("2"))
    matcher.rollback(1)
    assert matcher.allowed_tokens() == after_one
    with pytest.raises(PieError) as err:
        matcher.rollback(2)
    assert err.value.code == "invalid-argument"
    matcher.reset()
    assert matcher.allowed_tokens() == start


@pytest.mark.parametrize("make, source, words", [
    (GrammarMatcher.json_schema, "{not json", "JSON"),
    (GrammarMatcher.json_schema, '{"type": "bogus"}', "bogus"),
    (GrammarMatcher.regex, "[a-", "unclosed"),
    (GrammarMatcher.ebnf, "root ::= undefined_rule", "undefined_rule"),
])
def test_invalid_grammars_are_invalid_argument_with_the_reason(served, make, source, words):
    with pytest.raises(PieError) as err:
        make(served, source)
    assert err.value.code == "invalid-argument"
    assert words in err.value.message


def test_mask_covers_the_model_vocabulary_beyond_the_tokenizer(served):
    padded = SimpleNamespace(**{**vars(served), "vocab_size": served.vocab_size + 40})
    matcher = GrammarMatcher.regex(padded, "[a-z]+")
    mask = decode_brle(matcher.allowed_tokens(), padded.vocab_size, "allowed")
    assert not mask[served.vocab_size:].any() and mask[: served.vocab_size].any()


@given(st.lists(st.booleans(), max_size=80))
def test_brle_of_equals_the_host_encoding(bits):
    assert brle_of(np.array(bits, dtype=bool)) == encode_brle(bits)
