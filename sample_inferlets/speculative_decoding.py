"""Speculative decoding with an n-gram drafter and tree verification.

Each step drafts several candidate continuations (what followed earlier
occurrences of the last n tokens), lays them out as a token tree after the
newest token, and verifies the whole tree in ONE forward pass: an attention
mask lets each draft token see the context and its own branch only, and a
greedy sample is requested at every tree node. The longest branch prefix the
model agrees with is kept (its KV is moved next to the context if it was not
the first branch) and the rest is rolled back. Every step yields at least
one token, and the output is exactly plain greedy decoding's.

Returns JSON: {"text", "tokens", "passes", "drafted", "accepted", "later_branch",
"acceptance_rate"}.
"""

import json

import inferlet
from inferlet import Context, Sampler, brle, raw

inferlet.declare(
    name="speculative-decoding",
    version="0.1.0",
    description="Greedy decoding sped up by n-gram drafts verified as a tree in one pass.",
    arguments=[
        inferlet.Arg("prompt", str, default="a b c d a b c d a b", help="Text to continue."),
        inferlet.Arg("max-tokens", int, default=32, help="Most tokens to generate."),
        inferlet.Arg("ngram", int, default=2, help="Tokens matched to find a draft."),
        inferlet.Arg("depth", int, default=4, help="Most tokens per draft branch."),
        inferlet.Arg("branches", int, default=3, help="Most draft branches per step."),
    ],
)


def draft_branches(history: list, n: int, depth: int, branches: int) -> list:
    """Distinct continuations of the most recent occurrences of the last n tokens."""
    key = history[-n:]
    found = []
    for start in range(len(history) - n - 1, -1, -1):
        if history[start:start + n] == key:
            follow = history[start + n:start + n + depth]
            if follow and follow not in found:
                found.append(follow)
                if len(found) == branches:
                    break
    return found


def main(args) -> str:
    model = inferlet.get_model()
    eos = set(model.eos_tokens)
    ps = model.page_size
    ctx = Context(model)
    ctx.fill(args.prompt)
    ctx.flush()  # the prompt, except its last token, which starts the first tree

    generated: list = []
    passes = drafted = accepted = 0
    later_branch = 0  # passes won by a branch other than the first: what the tree adds over one draft
    while len(generated) < args.max_tokens and not (generated and generated[-1] in eos):
        room = args.max_tokens - len(generated) - 1  # the model's own token always comes too
        tree = [b[:room] for b in draft_branches(ctx.tokens + ctx.pending, args.ngram, args.depth,
                                                args.branches)] if room > 0 else []
        tree = [b for b in tree if b]
        root = ctx.kv_len  # slot of the pending token; no eviction here, so also its position
        tokens, positions, visible = list(ctx.pending), [root], [[(0, root + 1)]]
        slot = root + 1
        for branch in tree:
            first = slot
            for depth, token in enumerate(branch):
                tokens.append(token)
                positions.append(root + 1 + depth)  # RoPE position by depth, whatever the slot
                # The context and root, then this branch up to itself: nothing of other branches.
                visible.append([(0, root + 1), (first, slot + 1)])
                slot += 1
        masks = [brle.from_ranges(slot, ranges) for ranges in visible]  # over every slot after the pass
        ctx.fill_tokens(tokens[1:])  # the pending root, then the tree, go in one pass
        outputs = [raw.OutputRequestSample(raw.SampleSpec(**Sampler.greedy().spec_fields(i, 0)))
                   for i in range(len(tokens))]
        drawn = [out.value for out in ctx.forward(outputs, positions=positions, mask=masks)]
        passes += 1
        drafted += sum(len(b) for b in tree)

        # Walk the tree: follow the branch whose tokens match the model's draws.
        new = [drawn[0]]
        best, best_start = [], root + 1
        start = root + 1
        for branch in tree:
            n = 0
            while n < len(branch) and branch[n] == (drawn[0] if n == 0 else drawn[start - root + n - 1]):
                n += 1
            if n > len(best):
                best, best_start = branch[:n], start
            start += len(branch)
        if best:
            new = best + [drawn[best_start - root + len(best) - 1]]
        accepted += len(best)
        later_branch += bool(best) and best_start != root + 1

        # Keep the accepted drafts' KV right after the root; drop the rest.
        for i in range(len(best)):
            src, dst = best_start + i, root + 1 + i
            if src != dst:
                raw_copy(ctx, src, dst, ps)
        ctx.tokens[root + 1:root + 1 + len(best)] = best
        ctx.rollback(ctx.kv_len - (root + 1 + len(best)))
        for token in new:
            generated.append(token)
            if token in eos or len(generated) == args.max_tokens:
                break
        ctx.fill_tokens([generated[-1]])

    text_tokens = generated[:-1] if generated and generated[-1] in eos else generated
    ctx.release()
    return json.dumps({
        "text": model.tokenizer.decode(text_tokens), "tokens": generated, "passes": passes,
        "drafted": drafted, "accepted": accepted, "later_branch": later_branch,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
    })


def raw_copy(ctx: Context, src: int, dst: int, ps: int) -> None:
    """Copies one token's KV from slot src to slot dst of ctx (same positions, so RoPE stays right)."""
    ctx.queue.copy_slots(ctx.pages[src // ps], src % ps, ctx.pages[dst // ps], dst % ps, 1)
