"""What a component may import from this host, and a clear error when it imports more.

A component is linked against the host's linker: the `pie:inferlet`
interfaces of the contract this host implements and WASI 0.2 for a CLI
program (no `wasi:http`). wasmtime reports a missing import as the type
mismatch it meets first (e.g. "instance export `fields` has the wrong
type"); `check_imports` names every import the host lacks, says what it
provides instead, and how to rebuild.
"""

from __future__ import annotations

from typing import Any, Iterable

import wasmtime

from pie_runtime.errors import PieError
from pie_runtime.host.contract import WIT_PACKAGE, WIT_VERSION
from pie_runtime.host.linker import provided_interfaces

# The WASI 0.2 packages of wasmtime's CLI linker (`add_wasip2`).
WASI_PACKAGES = ("wasi:cli", "wasi:clocks", "wasi:filesystem", "wasi:io", "wasi:random", "wasi:sockets")
WASI_MAJOR = "0.2."


def offered() -> str:
    """What the host provides, in one line for error messages."""
    return (f"{WIT_PACKAGE}@{WIT_VERSION} ({', '.join(provided_interfaces())}) and WASI 0.2 for CLI "
            f"programs ({', '.join(WASI_PACKAGES)}); no wasi:http")


def _problem(name: str) -> str | None:
    """Why the host cannot satisfy import `name` (None when it can)."""
    package, _, rest = name.partition("/")
    interface, _, version = rest.partition("@")
    if package == WIT_PACKAGE:
        if version != WIT_VERSION:
            return (f"{name}: built against {WIT_PACKAGE}@{version or '?'}, this host implements "
                    f"{WIT_VERSION} (rebuild the inferlet with this pie-build)")
        if interface not in provided_interfaces():
            return f"{name}: no such interface in {WIT_PACKAGE}@{WIT_VERSION}"
        return None
    if package in WASI_PACKAGES and version.startswith(WASI_MAJOR):
        return None
    hint = ""
    if package == "wasi:http":
        hint = (" (componentize-js adds it unless built with `-d http fetch-event`, "
                "which pie-build passes)")
    return f"{name}: not provided{hint}"


def unsupported_imports(names: Iterable[str]) -> list[str]:
    """One line per import in `names` the host cannot satisfy."""
    return [problem for problem in map(_problem, sorted(names)) if problem is not None]


def check_imports(component: Any, engine: wasmtime.Engine) -> None:
    """Raises `PieError` (unsupported) naming every import of `component` this host lacks."""
    problems = unsupported_imports(component.type.imports(engine))
    if problems:
        raise PieError.unsupported(
            "the component imports what this host does not provide:\n  " + "\n  ".join(problems)
            + f"\nthe host provides {offered()}")
