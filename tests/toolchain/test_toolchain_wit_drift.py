"""Drift: the contract (wit/), the Python SDK, the JavaScript SDK and the host agree.

- Python SDK: every WIT function has a binding in `inferlet.raw.BINDINGS` (and
  vice versa), where componentize-py's generated bindings put it.
- JavaScript SDK: its binding table (`js/sdk/raw.js`) names every WIT function
  and imports each interface at the contract's version (the table's bindings
  are checked inside a real guest in test_toolchain_js.py).
- Host: it implements the contract's version and binds every WIT function
  under its linker name (tests/runtime/test_host.py also compares the
  bindings with a real component's imports).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from inferlet_toolchain.wit_spec import find_wit_dir, linker_names, package_version, parse_functions, wit_functions

SDK = Path(__file__).resolve().parents[2] / "inferlet_toolchain" / "inferlet"
JS_SDK = Path(__file__).resolve().parents[2] / "inferlet_toolchain" / "js" / "sdk"


def sdk_binding_table() -> set[tuple]:
    """The keys of inferlet.raw.BINDINGS, read without importing (it needs wit_world)."""
    tree = ast.parse((SDK / "raw.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "BINDINGS":
            return {ast.literal_eval(key) for key in node.value.keys}
    raise AssertionError("raw.py has no BINDINGS table")


def test_every_imported_wit_function_has_an_sdk_binding() -> None:
    wit = {f for f in wit_functions() if f[0] != "run"}
    assert len(wit) > 30
    sdk = sdk_binding_table()
    assert wit - sdk == set(), "WIT functions without an SDK binding"
    assert sdk - wit == set(), "SDK bindings for functions the WIT does not have"


def test_generated_bindings_have_every_function(tmp_path: Path) -> None:
    """componentize-py's generated Python has each function where raw.py expects it."""
    subprocess.run([sys.executable, "-c", "import sys, componentize_py; sys.exit(componentize_py.script())",
                    "-d", str(find_wit_dir()), "-w", "inferlet", "bindings", str(tmp_path)],
                   check=True, capture_output=True)
    for interface, resource, function in wit_functions():
        folder = "exports" if interface == "run" else "imports"
        module = ast.parse((tmp_path / "wit_world" / folder / f"{interface.replace('-', '_')}.py").read_text())
        if interface == "run":
            module = ast.parse((tmp_path / "wit_world" / "exports" / "__init__.py").read_text())
            resource = "run"
        scope = module.body
        if resource is not None:
            cls = "".join(part.capitalize() for part in resource.split("-"))
            classes = [n for n in module.body if isinstance(n, ast.ClassDef) and n.name == cls]
            assert classes, f"no class {cls} for {interface}/{resource}"
            scope = classes[0].body
        names = {n.name for n in scope if isinstance(n, ast.FunctionDef)}
        assert function.replace("-", "_") in names, (interface, resource, function)


def test_parser_handles_resources_static_and_comments() -> None:
    text = """
    package a:b;
    interface i {
        // f: func();  (a comment, not a function)
        resource r {
            constructor(x: u32);
            m: func() -> u32;
            s: static func() -> r;
        }
        g: func(a: list<u32>) -> result<_, string>;
    }
    world w { import i; export h: func(); }
    """
    assert parse_functions(text) == [("i", "r", "constructor"), ("i", "r", "m"), ("i", "r", "s"), ("i", None, "g")]


def test_linker_names() -> None:
    names = linker_names()
    assert names[("inference", "queue", "forward")] == "[method]queue.forward"
    assert package_version() == "0.2.0"
    assert names[("model", "model", "open")] == "[static]model.open"
    assert names[("runtime", None, "poll")] == "poll"


def test_the_js_sdk_binding_table_names_every_wit_function() -> None:
    rows = re.findall(r"^\s*\['([\w-]+)', (null|'[\w-]+'), '([\w-]+)',", (JS_SDK / "raw.js").read_text(), re.M)
    table = [(iface, None if resource == "null" else resource.strip("'"), fn) for iface, resource, fn in rows]
    assert len(table) == len(set(table)), "a function is listed twice"
    assert set(table) == {f for f in wit_functions() if f[0] != "run"}


def test_the_js_sdk_imports_the_contract_at_its_version() -> None:
    version = package_version()
    interfaces = {f[0] for f in wit_functions() if f[0] != "run"}
    imported = {}
    for path in JS_SDK.glob("*.js"):
        for iface, at in re.findall(r"from 'pie:inferlet/([\w-]+)@([^']+)'", path.read_text()):
            imported.setdefault(iface, set()).add(at)
    assert set(imported) == interfaces
    assert all(versions == {version} for versions in imported.values()), imported


def test_the_host_implements_the_contract_version_and_binds_every_function() -> None:
    from pie_runtime.host.contract import RUN_INTERFACE, WIT_PACKAGE, WIT_VERSION
    from pie_runtime.host.linker import bound_function_names

    assert WIT_VERSION == package_version()
    assert RUN_INTERFACE == f"pie:inferlet/run@{WIT_VERSION}"
    expected = {f"{WIT_PACKAGE}/{iface}@{WIT_VERSION}#{name}"
                for (iface, _, _), name in linker_names().items() if iface != "run"}
    bound = bound_function_names()
    assert len(bound) == len(set(bound))
    assert set(bound) == expected
