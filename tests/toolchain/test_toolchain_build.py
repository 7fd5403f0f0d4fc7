"""pie-build on real components: manifest, contract conformance, cache."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest

from inferlet_toolchain.build import build, cache_key
from inferlet_toolchain.manifest import read_manifest
from inferlet_toolchain.source_check import check_source
from inferlet_toolchain.wit_spec import exported_functions, find_wit_dir, linker_names, package_version

SAMPLES = Path(__file__).resolve().parents[2] / "sample_inferlets"

pytestmark = pytest.mark.slow
# The module (the package re-exports its `build` function under the same name).
build_module = importlib.import_module("inferlet_toolchain.build")


def test_manifest_reads_back_equal(text_completion_wasm: Path) -> None:
    declared = check_source(SAMPLES / "text_completion.py").manifest
    assert read_manifest(text_completion_wasm) == declared
    assert declared.name == "text-completion"
    assert [a.name for a in declared.arguments] == ["prompt", "max-tokens", "temperature", "top-p", "seed", "chat"]
    assert declared.parse_cli([]) == [
        "--prompt=The capital of France is", "--max-tokens=64", "--temperature=0.0", "--top-p=1.0", "--chat=false"]


def test_component_matches_the_contract(text_completion_wasm: Path) -> None:
    """Compiles the component with wasmtime and compares its imports/exports with wit/."""
    wasmtime = pytest.importorskip("wasmtime")
    from wasmtime.component import Component, ComponentInstanceType

    engine = wasmtime.Engine()
    ty = Component.from_file(engine, str(text_completion_wasm)).type
    imports = {name: item.ty for name, item in ty.imports(engine).items()}
    exports = {name: item.ty for name, item in ty.exports(engine).items()}

    version = package_version()
    expected: dict[str, set[str]] = {}
    for (interface, _resource, _function), name in linker_names(find_wit_dir()).items():
        expected.setdefault(interface, set()).add(name)
    for interface, names in expected.items():
        key = f"pie:inferlet/{interface}@{version}"
        table = exports if interface in exported_functions() else imports
        assert key in table, f"component lacks {key}"
        instance = table[key]
        assert isinstance(instance, ComponentInstanceType)
        functions = {n for n, item in instance.exports(engine).items() if type(item.ty).__name__ == "FuncType"}
        assert functions == names, key
    # Nothing else of ours is imported (WASI is the only other family).
    ours = {k for k in imports if k.startswith("pie:")}
    assert ours == {f"pie:inferlet/{i}@{version}" for i in expected if i not in exported_functions()}
    assert all(k.startswith(("pie:", "wasi:")) for k in imports)


def test_unchanged_rebuild_is_a_cache_hit(text_completion_wasm: Path, build_cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs):
        raise AssertionError("componentize-py ran for an unchanged source")

    monkeypatch.setattr(build_module, "_componentize", no_compiler)
    out = build(SAMPLES / "text_completion.py", tmp_path / "again.wasm", cache_dir=build_cache, quiet=True)
    assert out.read_bytes() == text_completion_wasm.read_bytes()
    # Without -o the component is named after the declaration, in the cwd.
    monkeypatch.chdir(tmp_path)
    assert build(SAMPLES / "text_completion.py", cache_dir=build_cache, quiet=True) == tmp_path / "text-completion.wasm"


def test_cache_key_follows_the_content(tmp_path: Path) -> None:
    source = tmp_path / "app.py"
    shutil.copyfile(SAMPLES / "text_completion.py", source)
    wit = find_wit_dir()
    first = cache_key(check_source(source), wit)
    assert cache_key(check_source(source), wit) == first
    source.write_text(source.read_text() + "\n# an edit\n")
    assert cache_key(check_source(source), wit) != first
    os.utime(source)  # timestamps alone do not matter
    assert cache_key(check_source(source), wit) == cache_key(check_source(source), wit)
