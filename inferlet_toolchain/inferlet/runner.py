"""The glue behind the component's `run` export.

pie-build generates the entry module as
`Run = inferlet.runner.make_run(user_module, MANIFEST_JSON)`: the exported
`run` parses `runtime.arguments()` against the manifest's arguments, calls
the user's `main(args)` (sync or async), and returns its string; any
exception becomes the `Err` string with its traceback. Guest-only.
"""

from __future__ import annotations

import inspect
import json
import traceback
from types import ModuleType
from typing import Any, Awaitable, Callable, TypeVar

from wit_world import exports

from . import context as _context  # noqa: F401 - bundled at build time (the guest cannot import later)
from . import host as _host  # noqa: F401
from . import raw
from .args import ArgSpec, Args, parse
from .loop import run as _run_loop

T = TypeVar("T")


def run_async(coro: Awaitable[T]) -> T:
    """Runs a coroutine on the inferlet event loop (from synchronous code)."""
    return _run_loop(coro, raw.runtime.poll)


def _call_main(main: Callable[..., Any], manifest: dict[str, Any]) -> str:
    specs = [ArgSpec.from_json(spec) for spec in manifest.get("arguments", [])]
    args = Args(parse(specs, list(raw.runtime.arguments())))
    takes_args = bool(inspect.signature(main).parameters)
    result = main(args) if takes_args else main()
    if inspect.isawaitable(result):
        result = run_async(result)
    if result is None:
        return ""
    if not isinstance(result, str):
        raise TypeError(f"main() must return a str (or None), got {type(result).__name__}")
    return result


def make_run(module: ModuleType, manifest_json: str) -> type:
    """The `Run` export class for a user module defining `main`."""
    manifest = json.loads(manifest_json)
    main = getattr(module, "main", None)
    if not callable(main):
        raise TypeError(f"{module.__name__} does not define main(args)")

    class Run(exports.Run):
        def run(self) -> str:
            try:
                return _call_main(main, manifest)
            except BaseException as error:  # noqa: BLE001 - every failure goes back to the host
                text = "".join(traceback.format_exception(error)).rstrip()
                raise raw.Err(text) from None

    return Run
