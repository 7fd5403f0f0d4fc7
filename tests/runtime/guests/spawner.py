"""Test inferlet for runtime.launch through the SDK (built with pie-build, unlike the raw probe).

Launches `--children` children concurrently with `inferlet.launch_async`, then
one more with the blocking `inferlet.launch`, and returns their results as a
JSON list in launch order. "{i}" in `--child-args` becomes the child's index.
With `--leaf` it is such a child: it sends one message and returns its tag.
"""

import asyncio
import json

import inferlet

inferlet.declare(
    name="spawner",
    description="Launches children of itself or of a registered program.",
    arguments=[
        inferlet.Arg("program", str, default="", help="Program to launch ('' = this one)."),
        inferlet.Arg("children", int, default=2, help="Children launched concurrently."),
        inferlet.Arg("child-args", str, default="--leaf --tag {i}", help="Each child's arguments."),
        inferlet.Arg("leaf", bool, default=False, help="Be a child: send a message, return the tag."),
        inferlet.Arg("tag", str, default="", help="What a leaf returns."),
    ],
    capabilities=["launch"],
)


async def main(args) -> str:
    if args.leaf:
        inferlet.send(f"leaf {args.tag}")
        return f"tag-{args.tag}"

    def child_args(i: int) -> list[str]:
        return args.child_args.replace("{i}", str(i)).split()

    results = await asyncio.gather(*(inferlet.launch_async(child_args(i), program=args.program)
                                     for i in range(args.children)))
    results.append(inferlet.launch(child_args(args.children), program=args.program))
    return json.dumps(results)
