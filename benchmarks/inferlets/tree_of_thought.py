"""Benchmark inferlet: tree-of-thought expansion, with fork sharing or with re-prefill.

A problem statement is expanded into a tree: every node generates one
"thought" of exactly `thought-tokens` tokens (greedy, EOS ignored) after a
short branch label, and has `branching` children, down to `depth` levels
(branching + branching^2 + ... thoughts). Siblings run concurrently
(`asyncio.gather`), so the server batches them.

  fork       the problem is prefilled once; each child forks its parent's
             context (full KV pages shared, the partial last page copied) and
             only prefills its own label
  reprefill  each node starts a fresh context and prefills the whole path
             text (problem + the thoughts above it + its label) again

Returns "prefilled=<tokens run as prompt> generated=<tokens generated> nodes=<thoughts>".
"""

import asyncio

import inferlet
from inferlet import Context, Sampler, Stop

inferlet.declare(
    name="bench-tree-of-thought",
    version="0.1.0",
    description="Tree-of-thought benchmark: forks sharing KV vs every branch re-prefilling its prefix.",
    arguments=[
        inferlet.Arg("mode", str, default="fork", help="fork | reprefill"),
        inferlet.Arg("depth", int, default=2, help="Levels of thoughts below the problem."),
        inferlet.Arg("branching", int, default=3, help="Children per node."),
        inferlet.Arg("thought-tokens", int, default=8, help="Tokens generated per thought."),
        inferlet.Arg("problem", int, default=0, help="Problem number (varies the prompt)."),
    ],
)

_FACTS = [
    "Each crate holds twelve bottles and each bottle holds three quarters of a litre.",
    "A delivery van carries at most forty crates and drives four routes a day.",
    "On rainy days one route is cancelled and the van carries ten fewer crates.",
    "The warehouse opens at six in the morning and closes at eight in the evening.",
    "Every third day the warehouse receives a shipment of two hundred crates.",
    "Broken bottles are replaced the next day from a reserve of sixty crates.",
]


def problem_text(n: int) -> str:
    facts = " ".join(_FACTS[(n + i) % len(_FACTS)] for i in range(len(_FACTS)))
    return (f"Problem {n}: {facts} How many litres can be delivered in a week with two rainy days? "
            "Let us think step by step and consider several approaches.\n")


def label(level: int, index: int) -> str:
    return f"Approach {level}.{index}:"


class Counter:
    def __init__(self) -> None:
        self.prefilled = 0
        self.generated = 0
        self.nodes = 0


async def expand_fork(ctx: Context, level: int, args, stop: Stop, counter: Counter) -> None:
    if level > args.depth:
        return

    async def child(i: int, fork: Context) -> None:
        fork.fill(label(level, i))
        counter.prefilled += len(fork.pending)
        await fork.generate_async(Sampler.greedy(), stop)
        counter.generated += len(fork.generated)
        counter.nodes += 1
        await expand_fork(fork, level + 1, args, stop, counter)
        fork.release()

    forks = [await ctx.fork_async() for _ in range(args.branching)]
    await asyncio.gather(*(child(i, f) for i, f in enumerate(forks)))


async def expand_reprefill(path: str, level: int, args, stop: Stop, counter: Counter) -> None:
    if level > args.depth:
        return

    async def child(i: int) -> None:
        ctx = Context(inferlet.get_model())
        ctx.fill(path + label(level, i))
        counter.prefilled += len(ctx.pending)
        text = await ctx.generate_async(Sampler.greedy(), stop)
        counter.generated += len(ctx.generated)
        counter.nodes += 1
        ctx.release()
        await expand_reprefill(path + label(level, i) + text + "\n", level + 1, args, stop, counter)

    await asyncio.gather(*(child(i) for i in range(args.branching)))


async def main(args) -> str:
    stop = Stop(max_tokens=args.thought_tokens, eos=False)
    counter = Counter()
    problem = problem_text(args.problem)
    if args.mode == "fork":
        root = Context(inferlet.get_model())
        root.fill(problem)
        counter.prefilled += len(root.pending)
        # Prefill all of it (flush would keep the last token pending): each fork then only adds its label.
        await root.forward_async([])
        await expand_fork(root, 1, args, stop, counter)
        root.release()
    elif args.mode == "reprefill":
        await expand_reprefill(problem, 1, args, stop, counter)
    else:
        raise ValueError(f"unknown mode {args.mode!r}")
    return f"prefilled={counter.prefilled} generated={counter.generated} nodes={counter.nodes}"

