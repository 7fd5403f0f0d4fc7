"""Constrained decoding: generate text that a JSON schema, a regex or a grammar accepts.

Each step asks the server's grammar matcher which tokens keep the output
inside the grammar and samples only among them (the `allowed` mask of the
sample request, applied on the device over the whole vocabulary); the
drawn token then advances the matcher. Generation ends when the match is
complete, at EOS (only allowed where the grammar may end) or at
--max-tokens.

    pie-run constrained-decoding.wasm -- --prompt "User:" \\
        --schema '{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"]}'

Returns the generated text.
"""

import inferlet
from inferlet import Context, Grammar, Sampler, Stop

inferlet.declare(
    name="constrained-decoding",
    version="0.1.0",
    description="Generates text constrained by a JSON schema, a regular expression or an EBNF grammar.",
    arguments=[
        inferlet.Arg("schema", str, help="JSON Schema the output must validate against."),
        inferlet.Arg("regex", str, help="Regular expression the output must fully match."),
        inferlet.Arg("ebnf", str, help="GBNF (start `root`) or Lark (start `start`) grammar of the output."),
        inferlet.Arg("prompt", str, default="Answer in JSON:", help="Text before the output."),
        inferlet.Arg("max-tokens", int, default=64, help="Most tokens to generate."),
        inferlet.Arg("temperature", float, default=0.0, help="0 = greedy decoding."),
        inferlet.Arg("seed", int, help="Seed for reproducible sampling."),
    ],
)


def main(args) -> str:
    given = {name: value for name, value in
             (("schema", args.schema), ("regex", args.regex), ("ebnf", args.ebnf)) if value is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of --schema, --regex, --ebnf")
    (kind, source), = given.items()
    grammar = {"schema": Grammar.json_schema, "regex": Grammar.regex, "ebnf": Grammar.ebnf}[kind](source)

    model = inferlet.get_model()
    # Compiled (and checked) on the server before any forward pass: an
    # invalid grammar fails here with the parser's message.
    matcher = grammar.matcher(model)

    ctx = Context(model)
    ctx.fill(args.prompt)
    sampler = Sampler.greedy() if args.temperature == 0 else Sampler.random(args.temperature, seed=args.seed)
    text = ctx.generate(sampler, Stop(max_tokens=args.max_tokens), grammar=matcher)
    complete = matcher.is_accepting()
    matcher.close()
    ctx.release()
    if not complete:
        raise RuntimeError(f"the output is not complete after {args.max_tokens} tokens: {text!r}")
    return text
