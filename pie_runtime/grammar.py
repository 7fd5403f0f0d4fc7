"""Token-level grammar matchers for constrained decoding (what the WIT `grammar` interface serves).

A `GrammarMatcher` follows a JSON schema, a regular expression or an
EBNF/Lark grammar over one model's vocabulary with llguidance (its Earley
parser and lexer run in Rust, off the GIL while masks are computed). The
guest asks for the allowed next tokens as a BRLE, passes it as a sample
request's `allowed` mask, and accepts the drawn token.

The llguidance tokenizer (the model's Hugging Face tokenizer plus its token
trie) is built once per model tokenizer and shared by every matcher on it;
matchers are per instance and hold only parser state.

The host binds it to the WIT `grammar` interface in `pie_runtime.host.grammar`.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Sequence

import llguidance
import numpy as np

from pie_runtime.errors import PieError

# A library error can quote the whole grammar; a guest needs the start of it.
_MAX_MESSAGE = 2000

# JSON is written as Python's json.dumps writes it: with free whitespace a
# model can pad forever (and a weak one does). A schema's own "x-guidance"
# options (e.g. {"whitespace_flexible": true}) override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: "weakref.WeakKeyDictionary[Any, dict[int, llguidance.LLTokenizer]]" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def eos_token_ids(served: Any) -> list[int]:
    """The tokens that end generation on `served` (the same ones `model.info` reports)."""
    eos = list(served.tokenizer.eos_token_ids) or list(served.engine.config.eos_token_ids)
    return [int(t) for t in eos]


def ll_tokenizer(served: Any) -> llguidance.LLTokenizer:
    """llguidance's view of `served`'s tokenizer, sized to the model's vocabulary (built once)."""
    tokenizer = served.tokenizer
    vocab = int(served.vocab_size)
    with _tokenizers_lock:
        by_vocab = _tokenizers.setdefault(tokenizer, {})
        ll = by_vocab.get(vocab)
        if ll is None:
            backend = copy.copy(tokenizer.backend)
            backend.no_padding()
            backend.no_truncation()
            # Ids past the tokenizer's (padded embedding rows) have no bytes
            # and so are never allowed; the mask still covers them.
            n_vocab = max(vocab, int(tokenizer.vocab_size))
            ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=eos_token_ids(served))
            by_vocab[vocab] = ll
        return ll


def _message(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " ..."


def bitmask_to_bool(bitmask: bytes, size: int) -> np.ndarray:
    """llguidance's token bitmask (32-bit little-endian words) as a bool array of `size`."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")
    out = np.zeros(size, dtype=bool)
    n = min(size, bits.size)
    out[:n] = bits[:n].astype(bool)
    return out


def brle_of(mask: np.ndarray) -> list[int]:
    """The WIT BRLE of a bool array (runs alternate false/true, starting with false)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return [0]
    starts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    runs = np.diff(np.concatenate(([0], starts, [mask.size])))
    if mask[0]:
        runs = np.concatenate(([0], runs))
    return [int(r) for r in runs]


class GrammarMatcher:
    """Parser state of one grammar over one model's vocabulary."""

    def __init__(self, served: Any, grammar: str, what: str) -> None:
        self.vocab_size = int(served.vocab_size)
        self.tokenizer = ll_tokenizer(served)
        self.eos = frozenset(self.tokenizer.eos_tokens)
        self._matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise PieError.invalid(f"invalid {what}: {_message(self._matcher.get_error())}")
        self._accepted = 0

    # ---------------------------------------------------------------- construction
    @classmethod
    def json_schema(cls, served: Any, schema: str) -> "GrammarMatcher":
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise PieError.invalid(f"invalid JSON schema: {_message(str(e))}") from None
        return cls(served, grammar, "JSON schema")

    @classmethod
    def regex(cls, served: Any, pattern: str) -> "GrammarMatcher":
        return cls(served, llguidance.LLMatcher.grammar_from_regex(pattern), "regular expression")

    @classmethod
    def ebnf(cls, served: Any, text: str) -> "GrammarMatcher":
        try:
            grammar = llguidance.grammar_from("ebnf", text)
        except ValueError as e:
            raise PieError.invalid(f"invalid grammar: {_message(str(e))}") from None
        return cls(served, grammar, "grammar")

    # ---------------------------------------------------------------- matching
    def accept(self, tokens: Sequence[int]) -> None:
        """Consumes `tokens`; nothing at all when one of them is not allowed."""
        tokens = [int(t) for t in tokens]
        for t in tokens:
            if not 0 <= t < self.vocab_size:
                raise PieError.invalid(f"token id {t} is outside the vocabulary [0, {self.vocab_size})")
        for i, t in enumerate(tokens):
            # llguidance's validate_tokens does not pass EOS once the parser
            # has stopped, though the mask allows it: EOS goes where the
            # match is complete.
            allowed = self._matcher.is_accepting() if t in self.eos else self._matcher.validate_tokens([t]) == 1
            if not (allowed and self._matcher.consume_token(t)):
                if self._matcher.is_error():
                    raise PieError.internal(f"grammar matcher failed: {_message(self._matcher.get_error())}")
                if i:
                    self._matcher.rollback(i)
                raise PieError.invalid(
                    f"token {t} ({self.tokenizer.dbg_tokens([t])}) at position {i} is not allowed by the grammar here")
        self._accepted += len(tokens)

    def allowed(self) -> np.ndarray:
        """Bool mask over the model's vocabulary of the tokens that may come next."""
        return bitmask_to_bool(self._matcher.compute_bitmask(), self.vocab_size)

    def allowed_tokens(self) -> list[int]:
        return brle_of(self.allowed())

    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def is_done(self) -> bool:
        return bool(self._matcher.is_stopped())

    def rollback(self, count: int) -> None:
        if count > self._accepted:
            raise PieError.invalid(f"cannot roll back {count} tokens: {self._accepted} were accepted")
        if count and not self._matcher.rollback(count):
            raise PieError.internal(f"grammar rollback failed: {_message(self._matcher.get_error())}")
        self._accepted -= count

    def reset(self) -> None:
        self._matcher.reset()
        self._accepted = 0
