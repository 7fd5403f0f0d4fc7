"""The `grammar` interface: grammar matchers for constrained decoding (`pie_runtime.grammar.GrammarMatcher`)."""

from __future__ import annotations

from typing import Any, Callable

from pie_runtime.grammar import GrammarMatcher
from pie_runtime.host.resource_table import Kind, borrowed, own


def _static(make: Callable[[Any, str], GrammarMatcher]) -> Callable[..., Any]:
    """A `from-...` constructor: a matcher over the model's vocabulary."""
    def fn(ctx, store, model, text):
        served = borrowed(ctx, store, model, Kind.MODEL).served
        return own(ctx, Kind.MATCHER, make(served, text))
    return fn


def _matcher(ctx, store, this) -> GrammarMatcher:
    return borrowed(ctx, store, this, Kind.MATCHER)


def _accept(ctx, store, this, tokens):
    _matcher(ctx, store, this).accept(tokens)


def _allowed_tokens(ctx, store, this):
    return _matcher(ctx, store, this).allowed_tokens()


def _is_accepting(ctx, store, this):
    return _matcher(ctx, store, this).is_accepting()


def _is_done(ctx, store, this):
    return _matcher(ctx, store, this).is_done()


def _rollback(ctx, store, this, count):
    _matcher(ctx, store, this).rollback(count)


def _reset(ctx, store, this):
    _matcher(ctx, store, this).reset()


RESOURCES = (("matcher", Kind.MATCHER),)
FUNCTIONS = (
    ("[static]matcher.from-json-schema", _static(GrammarMatcher.json_schema), True),
    ("[static]matcher.from-regex", _static(GrammarMatcher.regex), True),
    ("[static]matcher.from-ebnf", _static(GrammarMatcher.ebnf), True),
    ("[method]matcher.accept", _accept, True),
    ("[method]matcher.allowed-tokens", _allowed_tokens, False),
    ("[method]matcher.is-accepting", _is_accepting, False),
    ("[method]matcher.is-done", _is_done, False),
    ("[method]matcher.rollback", _rollback, True),
    ("[method]matcher.reset", _reset, False),
)
