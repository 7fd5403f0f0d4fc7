"""Hierarchical attention: a document tree prefilled in ONE pass with a custom mask.

The document is a title with sections under it. All of it goes through the
model in a single forward pass, with an attention mask that lets each
section see only the title and itself (not its siblings), and RoPE
positions that start every section right after the title. So each section
is encoded exactly as if it had been prefilled alone after the title, yet
the title is computed once and all sections share one pass.

The same pass draws each section's first continuation token. Then one fork
per section masks its siblings' KV slots (excluded from all later
attention) and continues the section greedily; the forks run concurrently.

Returns JSON: {"sections": [{"text", "tokens"}]}, one continuation per section.
"""

import asyncio
import json

import inferlet
from inferlet import Context, Sampler, Stop, brle, raw

inferlet.declare(
    name="hierarchical-attention",
    version="0.1.0",
    description="Encodes a document tree in one pass; each section attends to the title and itself.",
    arguments=[
        inferlet.Arg("title", str, default="Notes on Python.", help="The root of the document."),
        inferlet.Arg("sections", str, default=" Lists are mutable.| Tuples are not.",
                     help="Sections under the title, separated by '|'."),
        inferlet.Arg("max-tokens", int, default=16, help="Tokens to continue each section with."),
    ],
)


async def continue_section(doc: Context, spans: list, i: int, first: int, max_tokens: int) -> dict:
    """Section i's continuation: a fork of the document that cannot see the other sections."""
    ctx = await doc.fork_async()
    for j, (start, end) in enumerate(spans):
        if j != i:
            ctx.mask_tokens(start, end)
    _, end = spans[i]
    ctx.next_position = ctx.positions[end - 1] + 1  # right after this section, not after the longest
    ctx.fill_tokens([first])
    tokens = [first]
    if first not in doc.model.eos_tokens and max_tokens > 1:
        await ctx.generate_async(Sampler.greedy(), Stop(max_tokens=max_tokens - 1))
        tokens += ctx.generated
    ctx.release()
    return {"text": doc.model.tokenizer.decode(tokens), "tokens": tokens}


async def main(args) -> str:
    model = inferlet.get_model()
    tokenizer = model.tokenizer
    doc = Context(model)
    doc.fill(args.title)
    title_len = len(doc.pending)

    # Lay the sections out one after another in the KV; each starts at
    # position title_len and may attend to the title and to itself only.
    sections = [tokenizer.encode(s) for s in args.sections.split("|")]
    total = title_len + sum(map(len, sections))
    positions = list(range(title_len))
    masks = [brle.from_ranges(total, [(0, i + 1)]) for i in range(title_len)]  # the title: causal
    spans = []
    start = title_len
    for tokens in sections:
        doc.fill_tokens(tokens)
        positions += range(title_len, title_len + len(tokens))
        masks += [brle.from_ranges(total, [(0, title_len), (start, start + k + 1)]) for k in range(len(tokens))]
        spans.append((start, start + len(tokens)))
        start += len(tokens)

    greedy = Sampler.greedy()
    outputs = [raw.OutputRequestSample(raw.SampleSpec(**greedy.spec_fields(end - 1, 0))) for _, end in spans]
    firsts = [out.value for out in doc.forward(outputs, positions=positions, mask=masks)]

    continuations = await asyncio.gather(*(continue_section(doc, spans, i, first, args.max_tokens)
                                           for i, first in enumerate(firsts)))
    doc.release()
    return json.dumps({"sections": continuations})
