"""inferlet: the Python SDK for Pie inferlets.

An inferlet is a Python module that declares itself and defines `main`:

    import inferlet
    from inferlet import Context, Sampler, Stop

    inferlet.declare(name="hello", arguments=[inferlet.Arg("prompt", str, default="Hi")])

    def main(args) -> str:
        ctx = Context(inferlet.get_model())
        ctx.fill(args.prompt)
        return ctx.generate(Sampler.greedy(), Stop(max_tokens=32))

Layers: `inferlet.raw` is the contract itself (every WIT function);
`Model`/`Tokenizer`/`Context` are the high-level API; `Sampler`, `Stop`,
`Drafter`, `brle` and `args` are pure Python. The guest-only parts are
loaded on first use so the pure parts import anywhere (e.g. in host tests).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import brle
from .args import Args, ArgSpec, ArgumentError
from .declare import Arg, declare
from .drafter import Drafter, NgramDrafter
from .errors import InferletError
from .sampling import Sampler, Stop, TokenLogprobs

# name -> module that defines it (needs the Wasm bindings).
_GUEST = {
    "raw": None,
    "loop": None,
    "Context": "context",
    "Grammar": "grammar",
    "Matcher": "grammar",
    "Model": "model",
    "Tokenizer": "model",
    "get_model": "model",
    "models": "model",
    "version": "host",
    "instance_id": "host",
    "arguments": "host",
    "launch": "host",
    "launch_async": "host",
    "send": "host",
    "receive": "host",
    "receive_async": "host",
    "broadcast": "host",
    "subscribe": "host",
    "Subscription": "host",
    "store": "host",
    "run_async": "runner",
    "wait": "loop",
}


def __getattr__(name: str) -> Any:
    if name not in _GUEST:
        raise AttributeError(f"module 'inferlet' has no attribute {name!r}")
    module_name = _GUEST[name]
    if module_name is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), name)


__all__ = [
    "Arg", "Args", "ArgSpec", "ArgumentError", "Drafter", "InferletError", "NgramDrafter",
    "Sampler", "Stop", "TokenLogprobs", "brle", "declare", *_GUEST,
]
