"""Static checks of an inferlet's source, before any compilation.

Reads the source with `ast` only (nothing of the inferlet runs on the host)
and reports, with file:line, what would fail later inside Wasm or at launch:
syntax errors, imports of modules the guest cannot have (numpy, torch, C
extensions, anything outside the standard library and `inferlet`), a missing
`main`, and a malformed `inferlet.declare(...)`. Returns the manifest and the
files to bundle.
"""

from __future__ import annotations

import ast
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .inferlet.args import MISSING, TYPES, ArgSpec, ArgumentError
from .manifest import Manifest, ManifestError

# Modules generated inside every component (low-level use is allowed).
GENERATED_MODULES = {"wit_world", "componentize_py_types", "componentize_py_runtime"}

# Standard-library modules that do not exist or cannot work in the WASI
# build of CPython that componentize-py embeds (checked in a real guest).
WASM_UNAVAILABLE = {
    "ctypes": "C foreign functions do not exist in Wasm",
    "ssl": "there is no OpenSSL in the guest",
    "tkinter": "there is no GUI in the guest",
    "turtle": "there is no GUI in the guest",
    "curses": "there is no terminal in the guest",
    "readline": "there is no terminal in the guest",
    "termios": "there is no terminal in the guest",
    "pty": "there is no terminal in the guest",
    "mmap": "there is no mmap in WASI",
    "fcntl": "there is no fcntl in WASI",
    "resource": "there is no resource module in WASI",
    "grp": "there are no users in WASI",
    "pwd": "there are no users in WASI",
    "lzma": "the C library behind it is not in the guest",
    "bz2": "the C library behind it is not in the guest",
    "subprocess": "there are no processes in Wasm",
    "multiprocessing": "there are no processes in Wasm",
    "concurrent": "there are no threads or processes in Wasm; use asyncio",
    "crypt": "not in the guest",
    "nis": "not in the guest",
    "spwd": "not in the guest",
    "syslog": "not in the guest",
    "msvcrt": "not in the guest",
    "winreg": "not in the guest",
    "_winapi": "not in the guest",
}

# Common packages people reach for, with what to do instead.
_HINTS = {
    "numpy": "do the arithmetic in pure Python; sampling and logits stay on the server",
    "torch": "the model runs on the server; drive it through inferlet.Context",
    "jax": "the model runs on the server; drive it through inferlet.Context",
    "transformers": "the server tokenizes: use model.tokenizer",
    "tokenizers": "the server tokenizes: use model.tokenizer",
    "requests": "there is no network access in an inferlet",
}


class SourceError(Exception):
    """A problem in the inferlet's source, located at file:line(:col)."""

    def __init__(self, filename: str, line: Optional[int], message: str, col: Optional[int] = None) -> None:
        self.filename = filename
        self.line = line
        self.col = col
        self.reason = message
        where = filename
        if line is not None:
            where += f":{line}"
            if col is not None:
                where += f":{col}"
        super().__init__(f"{where}: {message}")


@dataclass
class SourceInfo:
    """What the build needs from a checked source."""

    path: Path
    manifest: Manifest
    # Sibling modules the inferlet imports (bundled next to it).
    local_files: list[Path] = field(default_factory=list)
    # Standard-library modules imported anywhere (imported eagerly at build
    # time: the guest only contains what was imported while it was built).
    stdlib_modules: set[str] = field(default_factory=set)


# CPython 3.11 keeps the AST constructor's recursion depth per interpreter, not
# per thread: two threads parsing at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905). pie-build may
# run in several threads (the sample tests build two inferlets at a time).
_AST_LOCK = threading.Lock()


def _parse(path: Path) -> ast.Module:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SourceError(str(path), None, f"cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SourceError(str(path), None, "the source is not UTF-8 text") from None
    try:
        with _AST_LOCK:
            return ast.parse(text, filename=str(path))
    except SyntaxError as error:
        raise SourceError(str(path), error.lineno, f"syntax error: {error.msg}", error.offset) from None


def _local_module(directory: Path, name: str) -> Optional[Path]:
    """The sibling file or package providing module `name`, if any."""
    if (directory / f"{name}.py").is_file():
        return directory / f"{name}.py"
    if (directory / name / "__init__.py").is_file():
        return directory / name
    return None


def _is_extension(directory: Path, name: str) -> bool:
    return any(directory.glob(f"{name}.*.so")) or any(directory.glob(f"{name}.*.pyd")) \
        or (directory / f"{name}.so").exists()


def _check_imports(path: Path, tree: ast.Module, info: SourceInfo, seen: set[Path]) -> None:
    directory = path.parent
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise SourceError(str(path), node.lineno,
                                  "relative imports are not supported: an inferlet is a module, "
                                  "import sibling modules by name")
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "inferlet" or top in GENERATED_MODULES:
                continue
            if _is_extension(directory, top):
                raise SourceError(str(path), node.lineno,
                                  f"cannot import {top!r}: it is a C extension, and inferlets run "
                                  "as WebAssembly (pure Python only)")
            local = _local_module(directory, top)
            if local is not None:
                if local not in seen:
                    seen.add(local)
                    info.local_files.append(local)
                    files = [local] if local.is_file() else sorted(local.rglob("*.py"))
                    for file in files:
                        _check_imports(file, _parse(file), info, seen)
                continue
            if top in sys.stdlib_module_names:
                if top in WASM_UNAVAILABLE:
                    raise SourceError(str(path), node.lineno,
                                      f"cannot import {top!r} in an inferlet: {WASM_UNAVAILABLE[top]}")
                info.stdlib_modules.add(name if isinstance(node, ast.Import) else top)
                continue
            hint = _HINTS.get(top, "only the Python standard library, `inferlet` and modules next "
                                   "to the source are available inside WebAssembly")
            raise SourceError(str(path), node.lineno,
                              f"cannot import {top!r} in an inferlet ({hint})")


def _check_main(path: Path, tree: ast.Module) -> None:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
            params = node.args
            positional = params.posonlyargs + params.args
            required = len(positional) - len(params.defaults)
            required_kw = [a for a, d in zip(params.kwonlyargs, params.kw_defaults) if d is None]
            if required > 1 or required_kw:
                raise SourceError(str(path), node.lineno,
                                  "main must take at most one argument (the parsed args)")
            return
    raise SourceError(str(path), None,
                      "no main function: define `def main(args) -> str` (or `async def main(args)`) "
                      "at module level")


class _Names:
    """How the source refers to `inferlet`, `declare` and `Arg`."""

    def __init__(self, tree: ast.Module) -> None:
        self.modules: set[str] = set()
        self.declare: set[str] = set()
        self.arg: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "inferlet":
                        self.modules.add(alias.asname or "inferlet")
            elif isinstance(node, ast.ImportFrom) and node.module in ("inferlet", "inferlet.declare"):
                for alias in node.names:
                    if alias.name == "declare":
                        self.declare.add(alias.asname or "declare")
                    elif alias.name == "Arg":
                        self.arg.add(alias.asname or "Arg")

    def is_call_to(self, node: ast.AST, attr: str, names: set[str]) -> bool:
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Name):
            return func.id in names
        return (isinstance(func, ast.Attribute) and func.attr == attr
                and isinstance(func.value, ast.Name) and func.value.id in self.modules)


def _literal(path: Path, node: ast.AST, what: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise SourceError(str(path), getattr(node, "lineno", None),
                          f"{what} must be a literal value (pie-build reads it without running "
                          "the inferlet)") from None


def _read_arg(path: Path, node: ast.AST, names: _Names) -> ArgSpec:
    line = getattr(node, "lineno", None)
    if not names.is_call_to(node, "Arg", names.arg):
        raise SourceError(str(path), line, "each entry of arguments=[...] must be an inferlet.Arg(...) call")
    assert isinstance(node, ast.Call)
    fields = ["name", "type", "default", "help", "required"]
    if len(node.args) > len(fields):
        raise SourceError(str(path), line, "Arg takes at most 5 positional arguments")
    given: dict[str, ast.AST] = dict(zip(fields, node.args))
    for keyword in node.keywords:
        if keyword.arg is None or keyword.arg not in fields:
            raise SourceError(str(path), line, f"Arg has no parameter {keyword.arg!r} "
                                               f"(parameters: {', '.join(fields)})")
        if keyword.arg in given:
            raise SourceError(str(path), line, f"Arg got {keyword.arg!r} twice")
        given[keyword.arg] = keyword.value
    if "name" not in given:
        raise SourceError(str(path), line, "Arg needs a name")
    type_name = "str"
    if "type" in given:
        type_node = given["type"]
        if isinstance(type_node, ast.Name) and type_node.id in TYPES:
            type_name = type_node.id
        elif isinstance(type_node, ast.Constant) and type_node.value in TYPES:
            type_name = type_node.value
        else:
            raise SourceError(str(path), line, f"Arg type must be one of {', '.join(TYPES)}")
    spec = ArgSpec(
        name=_literal(path, given["name"], "an argument name"),
        type=type_name,
        default=_literal(path, given["default"], "a default") if "default" in given else MISSING,
        help=_literal(path, given["help"], "help") if "help" in given else "",
        required=_literal(path, given["required"], "required") if "required" in given else False,
    )
    if not isinstance(spec.name, str) or not isinstance(spec.help, str) or not isinstance(spec.required, bool):
        raise SourceError(str(path), line, "Arg name and help must be strings, required a bool")
    try:
        spec.check()
    except ArgumentError as error:
        raise SourceError(str(path), line, str(error)) from None
    if spec.type == "float" and isinstance(spec.default, int):
        spec = ArgSpec(spec.name, spec.type, float(spec.default), spec.help, spec.required)
    return spec


def read_declaration(path: Path, tree: ast.Module) -> Manifest:
    """The manifest from the module-level `inferlet.declare(...)` call.

    Without one, the inferlet is named after its file and takes no arguments.
    """
    names = _Names(tree)
    calls = [node for node in ast.walk(tree) if names.is_call_to(node, "declare", names.declare)]
    top_level = {id(stmt.value) for stmt in tree.body if isinstance(stmt, ast.Expr)}
    if not calls:
        return Manifest(name=path.stem.replace("_", "-").lower())
    if len(calls) > 1:
        raise SourceError(str(path), calls[1].lineno, "inferlet.declare(...) may appear only once")
    call = calls[0]
    assert isinstance(call, ast.Call)
    if id(call) not in top_level:
        raise SourceError(str(path), call.lineno, "inferlet.declare(...) must be a module-level statement")
    if call.args:
        raise SourceError(str(path), call.lineno, "inferlet.declare takes keyword arguments only")
    fields = {"name", "version", "description", "arguments", "capabilities"}
    values: dict[str, Any] = {}
    arguments: list[ArgSpec] = []
    for keyword in call.keywords:
        if keyword.arg not in fields:
            raise SourceError(str(path), keyword.value.lineno,
                              f"declare has no field {keyword.arg!r} (fields: {', '.join(sorted(fields))})")
        if keyword.arg == "arguments":
            if not isinstance(keyword.value, (ast.List, ast.Tuple)):
                raise SourceError(str(path), keyword.value.lineno, "arguments must be a list of inferlet.Arg(...)")
            arguments = [_read_arg(path, element, names) for element in keyword.value.elts]
        else:
            values[keyword.arg] = _literal(path, keyword.value, keyword.arg)
    if "name" not in values:
        raise SourceError(str(path), call.lineno, "inferlet.declare needs a name=")
    capabilities = values.get("capabilities", [])
    if not isinstance(capabilities, (list, tuple)) or not all(isinstance(c, str) for c in capabilities):
        raise SourceError(str(path), call.lineno, "capabilities must be a list of strings")
    manifest = Manifest(
        name=values["name"],
        version=values.get("version", "0.1.0"),
        description=values.get("description", ""),
        arguments=arguments,
        capabilities=list(capabilities),
    )
    try:
        manifest.validate()
    except ManifestError as error:
        raise SourceError(str(path), call.lineno, error.reason) from None
    return manifest


def check_source(path: Path) -> SourceInfo:
    """Checks an inferlet source file; raises SourceError with file:line."""
    path = Path(path)
    if path.suffix != ".py":
        raise SourceError(str(path), None, "an inferlet source is a .py file")
    tree = _parse(path)
    manifest = read_declaration(path, tree)
    info = SourceInfo(path=path, manifest=manifest)
    _check_imports(path, tree, info, {path.resolve()})
    _check_main(path, tree)
    return info
