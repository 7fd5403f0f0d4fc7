"""The inferlet's self-description: `declare(...)` and `Arg(...)`.

Write one module-level call with literal values; pie-build reads it from the
source (with `ast`, nothing is executed on the host), checks it and embeds it
in the component as its manifest:

    import inferlet

    inferlet.declare(
        name="text-completion",
        version="0.1.0",
        description="Completes a prompt.",
        arguments=[
            inferlet.Arg("prompt", str, default="Hello", help="Text to complete."),
            inferlet.Arg("max-tokens", int, default=64, help="Most tokens to generate."),
            inferlet.Arg("chat", bool, help="Apply the chat template."),
        ],
        capabilities=[],
    )

Inside the guest the call does nothing: the arguments reach `main(args)`
already parsed against the embedded manifest. Pure Python.
"""

from __future__ import annotations

from typing import Any, Iterable

from .args import MISSING, ArgSpec


def Arg(name: str, type: type = str, default: Any = MISSING, help: str = "",  # noqa: N802 - reads like a type
        required: bool = False) -> ArgSpec:
    """One argument: `--name`, of type str/int/float/bool."""
    type_name = getattr(type, "__name__", str(type))
    return ArgSpec(name=name, type=type_name, default=default, help=help, required=required)


def declare(*, name: str, version: str = "0.1.0", description: str = "",
            arguments: Iterable[ArgSpec] = (), capabilities: Iterable[str] = ()) -> None:
    """Declares the inferlet (read by pie-build; a no-op at run time)."""
    return None
