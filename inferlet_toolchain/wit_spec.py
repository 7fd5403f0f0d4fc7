"""Where the contract lives, and which functions it declares.

`wit_functions()` lists every function of the `pie:inferlet` interfaces as
(interface, resource or None, function) tuples, in WIT names. The SDK's
binding table and the host's linker are both checked against it (drift
tests), so a function added to the WIT and forgotten on either side fails a
test instead of a user's inferlet.
"""

from __future__ import annotations

import re
from pathlib import Path

WitFunction = tuple[str, "str | None", str]

_PACKAGE_WIT = Path(__file__).resolve().parent / "wit"
_REPO_WIT = Path(__file__).resolve().parent.parent / "wit"

_TOKEN = re.compile(r"[A-Za-z_%][A-Za-z0-9_\-]*|[{}();:<>,=]|->|\S")


def find_wit_dir() -> Path:
    """The contract's directory: the repo's `wit/`, else a copy packaged with the toolchain."""
    for candidate in (_REPO_WIT, _PACKAGE_WIT):
        if (candidate / "inferlet.wit").is_file():
            return candidate
    raise FileNotFoundError(
        f"cannot find the WIT contract: neither {_REPO_WIT}/inferlet.wit nor "
        f"{_PACKAGE_WIT}/inferlet.wit exists"
    )


def package_version(wit_dir: "Path | None" = None) -> str:
    """The contract's version: X.Y.Z of `package pie:inferlet@X.Y.Z;`."""
    directory = wit_dir or find_wit_dir()
    for path in sorted(Path(directory).glob("*.wit")):
        found = re.search(r"^\s*package\s+pie:inferlet@([0-9][\w.\-+]*)\s*;",
                          _strip_comments(path.read_text(encoding="utf-8")), flags=re.M)
        if found:
            return found.group(1)
    raise ValueError(f"no `package pie:inferlet@VERSION;` in {directory}")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def parse_functions(text: str) -> list[WitFunction]:
    """Every function declared inside `interface` blocks of WIT source `text`."""
    return [fn for fn, _ in _parse(text)]


def _parse(text: str) -> list[tuple[WitFunction, str]]:
    """(function, kind) pairs; kind is freestanding/method/static/constructor."""
    tokens = _TOKEN.findall(_strip_comments(text))
    out: list[tuple[WitFunction, str]] = []
    # Stack of (kind, name) for each open brace: kind is interface/resource/world/other.
    stack: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("interface", "resource", "world") and i + 2 < len(tokens) and tokens[i + 2] == "{":
            stack.append((tok, tokens[i + 1]))
            i += 3
            continue
        if tok == "{":
            stack.append(("other", ""))
        elif tok == "}":
            if not stack:
                raise ValueError("unbalanced '}' in WIT source")
            stack.pop()
        elif (
            tok == ":" and i > 0 and i + 1 < len(tokens)
            and (tokens[i + 1] == "func" or tokens[i + 1:i + 3] == ["static", "func"]
                 or tokens[i + 1:i + 3] == ["async", "func"])
            and stack
        ):
            name = tokens[i - 1]
            interfaces = [n for kind, n in stack if kind == "interface"]
            if interfaces:
                top_kind, top_name = stack[-1]
                resource = top_name if top_kind == "resource" else None
                kind = "freestanding" if resource is None else (
                    "static" if tokens[i + 1] == "static" else "method")
                out.append(((interfaces[-1], resource, name.lstrip("%")), kind))
        elif tok == "constructor" and i + 1 < len(tokens) and tokens[i + 1] == "(" and stack:
            interfaces = [n for kind, n in stack if kind == "interface"]
            if interfaces and stack[-1][0] == "resource":
                out.append(((interfaces[-1], stack[-1][1], "constructor"), "constructor"))
        i += 1
    if stack:
        raise ValueError("unbalanced '{' in WIT source")
    return out


def wit_functions(wit_dir: "Path | None" = None) -> list[WitFunction]:
    """Every function of the contract, from all `.wit` files in `wit_dir`."""
    directory = wit_dir or find_wit_dir()
    out: list[WitFunction] = []
    for path in sorted(Path(directory).glob("*.wit")):
        out.extend(parse_functions(path.read_text(encoding="utf-8")))
    return out


def exported_functions(wit_dir: "Path | None" = None) -> set[str]:
    """Interfaces the `inferlet` world exports (the rest are imports)."""
    directory = wit_dir or find_wit_dir()
    text = " ".join(_strip_comments(p.read_text(encoding="utf-8")) for p in Path(directory).glob("*.wit"))
    return set(re.findall(r"\bexport\s+([A-Za-z][\w\-]*)\s*;", text))


def linker_names(wit_dir: "Path | None" = None) -> dict[WitFunction, str]:
    """Each function's name inside its interface instance, as a component
    linker spells it: `poll`, `[method]queue.forward`, `[static]model.open`."""
    directory = wit_dir or find_wit_dir()
    names: dict[WitFunction, str] = {}
    for path in sorted(Path(directory).glob("*.wit")):
        for (interface, resource, function), kind in _parse(path.read_text(encoding="utf-8")):
            if kind == "freestanding":
                name = function
            elif kind == "constructor":
                name = f"[constructor]{resource}"
            else:
                name = f"[{kind}]{resource}.{function}"
            names[(interface, resource, function)] = name
    return names
