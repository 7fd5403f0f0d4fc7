"""Constrained decoding: grammars and the matchers that enforce them.

A `Grammar` says what the output must look like (a JSON schema, a regular
expression or an EBNF/Lark grammar); a `Matcher` follows one over a model's
vocabulary, on the server, token by token. Generate under it with

    >>> ctx.generate(Sampler.greedy(), Stop(max_tokens=64),
    ...              grammar=Grammar.json_schema({"type": "object"}))

or drive a matcher by hand: put `matcher.allowed_tokens()` into a sample
request's `allowed` mask, then `matcher.accept(token)` with the drawn token.

Guest-only: imports the bindings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from . import raw
from .model import Model, call, get_model


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `kind` is "json-schema", "regex" or "ebnf"."""

    kind: str
    source: str

    @classmethod
    def json_schema(cls, schema: Union[str, dict]) -> "Grammar":
        """JSON text valid under `schema` (a JSON Schema, as a dict or as JSON text)."""
        return cls("json-schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        """Text that fully matches `pattern` (Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def ebnf(cls, grammar: str) -> "Grammar":
        """Text of a GBNF (llama.cpp, start `root`) or Lark (start `start`) grammar."""
        return cls("ebnf", grammar)

    def matcher(self, model: Optional[Model] = None) -> "Matcher":
        """A fresh matcher of this grammar over `model`'s vocabulary (default: the server's model)."""
        return Matcher(self, model)


class Matcher:
    """A grammar followed token by token over one model's vocabulary (state lives on the server).

    InferletError 'invalid-argument' (with the reason) when the grammar is
    invalid, and from `accept` when a token would leave the grammar.
    """

    def __init__(self, grammar: Grammar, model: Optional[Model] = None) -> None:
        self.grammar = grammar
        self.model = model if model is not None else get_model()
        make = {
            "json-schema": raw.Matcher.from_json_schema,
            "regex": raw.Matcher.from_regex,
            "ebnf": raw.Matcher.from_ebnf,
        }.get(grammar.kind)
        if make is None:
            raise ValueError(f"unknown grammar kind {grammar.kind!r}; expected json-schema, regex or ebnf")
        self.raw = call(make, self.model.raw, grammar.source)

    @classmethod
    def json_schema(cls, model: Optional[Model], schema: Union[str, dict]) -> "Matcher":
        return cls(Grammar.json_schema(schema), model)

    @classmethod
    def regex(cls, model: Optional[Model], pattern: str) -> "Matcher":
        return cls(Grammar.regex(pattern), model)

    @classmethod
    def ebnf(cls, model: Optional[Model], grammar: str) -> "Matcher":
        return cls(Grammar.ebnf(grammar), model)

    def accept(self, tokens: Union[int, Iterable[int]]) -> None:
        """Advances over one token or several (all or none: a disallowed one raises)."""
        call(self.raw.accept, [tokens] if isinstance(tokens, int) else list(tokens))

    def allowed_tokens(self) -> list[int]:
        """BRLE over the vocabulary of the tokens that may come next (EOS included where it may end)."""
        return list(self.raw.allowed_tokens())

    def is_accepting(self) -> bool:
        """The output so far is a complete match."""
        return self.raw.is_accepting()

    def is_done(self) -> bool:
        """Nothing but EOS may follow: the match is finished."""
        return self.raw.is_done()

    def rollback(self, count: int) -> None:
        """Forgets the last `count` accepted tokens."""
        call(self.raw.rollback, count)

    def reset(self) -> None:
        self.raw.reset()

    def close(self) -> None:
        """Releases the server-side matcher now instead of whenever the GC gets to it."""
        self.raw.__exit__(None, None, None)

    def __enter__(self) -> "Matcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
