"""Components built elsewhere: a manifest file embedded by pie-build, checked and granted by pie-run
exactly as a Python inferlet's; and a clear error for a component importing what the host lacks.

The guest (tests/runtime/guests/foreign.py) is built by componentize-py directly, with no SDK and no
manifest, as any other language's toolchain would build a component of the `inferlet` world.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from inferlet_toolchain.build import BuildError, build
from inferlet_toolchain.manifest import ManifestError, read_manifest
from pie_runtime import component_cache
from pie_runtime.cli import main
from pie_runtime.component_cache import ComponentCache
from pie_runtime.component_imports import unsupported_imports
from tests.runtime.guests.build import WIT, build_guest
from tests.runtime.guests.fixtures import PRECOMPILED, TEST_PIE_HOME

MODEL_OPTS = ["--page-size", "4", "--kv-pages", "64"]

MANIFEST_TOML = """\
name = "foreign"
version = "1.2.3"
description = "Built elsewhere."
capabilities = ["launch"]

[[arguments]]
name = "greeting"
type = "str"
default = "hello"
help = "What to say."

[[arguments]]
name = "times"
type = "int"
default = 1
help = "How often."

[[arguments]]
name = "spawn"
type = "bool"
help = "Launch a copy of itself."
"""


@pytest.fixture(scope="module", autouse=True)
def test_pie_home():
    mp = pytest.MonkeyPatch()
    mp.setenv("PIE_HOME", str(TEST_PIE_HOME))
    mp.setattr(component_cache, "_default_cache", ComponentCache(PRECOMPILED))
    yield
    mp.undo()


def pie_run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdin=io.StringIO(""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def foreign_wasm() -> Path:
    return build_guest("foreign")


@pytest.fixture(scope="module")
def with_toml(foreign_wasm, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("foreign")
    (folder / "foreign.toml").write_text(MANIFEST_TOML)
    return build(foreign_wasm, folder / "foreign.wasm", manifest=folder / "foreign.toml")


def test_pie_build_embeds_a_toml_manifest(with_toml, foreign_wasm):
    manifest = read_manifest(with_toml)
    assert (manifest.name, manifest.version, manifest.description) == ("foreign", "1.2.3", "Built elsewhere.")
    assert [(a.name, a.type) for a in manifest.arguments] == [("greeting", "str"), ("times", "int"), ("spawn", "bool")]
    assert manifest.capabilities == ["launch"]
    with pytest.raises(ManifestError):
        read_manifest(foreign_wasm)  # the input is left as it was


def test_pie_run_checks_arguments_against_it(with_toml, tiny_llama_dir):
    code, out, _ = pie_run([with_toml, "--", "--help"])
    assert code == 0
    assert "foreign 1.2.3: Built elsewhere." in out and "--times INT" in out and "capabilities: launch" in out
    code, _, err = pie_run([with_toml, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "--times", "often"])
    assert code == 2 and "--times: expected a int" in err
    code, _, err = pie_run([with_toml, "--model", tiny_llama_dir, *MODEL_OPTS, "--", "--colour", "red"])
    assert code == 2 and "unknown argument --colour" in err
    code, out, err = pie_run([with_toml, "--model", tiny_llama_dir, *MODEL_OPTS, "-q", "--", "--greeting", "hey"])
    assert code == 0, err
    assert json.loads(out.splitlines()[-1]) == {"arguments": ["--greeting=hey", "--times=1", "--spawn=false"]}


def test_declared_capabilities_are_granted_and_undeclared_ones_refused(with_toml, foreign_wasm, tiny_llama_dir,
                                                                      tmp_path):
    # Declared and allowed: granted.
    code, out, err = pie_run([with_toml, "--model", tiny_llama_dir, *MODEL_OPTS, "--allow", "launch", "-q",
                              "--", "--spawn"])
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    # The child's arguments went through the same manifest: canonical, defaults filled in.
    assert report["child"] == {"arguments": ["--greeting=from-child", "--times=1", "--spawn=false"]}

    (tmp_path / "m.json").write_text(json.dumps({"name": "foreign-no-launch", "arguments": [
        {"name": "greeting", "type": "str"}, {"name": "spawn", "type": "bool"}]}))
    without = build(foreign_wasm, tmp_path / "without.wasm", manifest=tmp_path / "m.json")
    # Allowed but not declared: refused.
    code, out, err = pie_run([without, "--model", tiny_llama_dir, *MODEL_OPTS, "--allow", "launch", "-q",
                              "--", "--spawn"])
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["child_error"] == "unsupported"


def test_bad_manifest_files_are_located_errors(foreign_wasm, tmp_path):
    with pytest.raises(BuildError, match="give its manifest with --manifest"):
        build(foreign_wasm, tmp_path / "x.wasm")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('name = "x"\nversion = \n')
    with pytest.raises(ManifestError, match=r"bad\.toml: not valid TOML"):
        build(foreign_wasm, tmp_path / "x.wasm", manifest=bad_toml)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "x", "arguments": [{"name": "n", "type": "matrix"}]}))
    with pytest.raises(ManifestError, match=r"wrong\.json: bad argument in manifest: .*type must be one of"):
        build(foreign_wasm, tmp_path / "x.wasm", manifest=wrong)
    with pytest.raises(ManifestError, match="a manifest file is .toml or .json"):
        build(foreign_wasm, tmp_path / "x.wasm", manifest=tmp_path / "bad.yaml")
    source = tmp_path / "app.py"
    source.write_text("x = 1\n")
    with pytest.raises(BuildError, match="declares its manifest in its source"):
        build(source, tmp_path / "x.wasm", manifest=wrong)


def test_an_import_the_host_lacks_is_named_with_what_the_host_offers(tmp_path, tiny_llama_dir):
    """A component of a world that imports one interface more than the host provides."""
    wit = tmp_path / "wit"
    wit.mkdir()
    shutil.copyfile(WIT / "inferlet.wit", wit / "inferlet.wit")
    (wit / "extra.wit").write_text("package pie:inferlet@0.2.0;\n\ninterface telemetry {\n"
                                   "    record-event: func(name: string);\n}\n\nworld inferlet-plus {\n"
                                   "    include inferlet;\n    import telemetry;\n}\n")
    wasm = build_guest("foreign", wit_dir=wit, world="inferlet-plus")
    code, _, err = pie_run([wasm, "--model", tiny_llama_dir, *MODEL_OPTS])
    assert code == 2
    assert "pie:inferlet/telemetry@0.2.0: no such interface in pie:inferlet@0.2.0" in err
    assert "the host provides pie:inferlet@0.2.0 (types, runtime" in err and "no wasi:http" in err

    from pie_runtime.host.registry import Host
    from tests.runtime.guests.fixtures import run

    outcome = run(Host([], guest_output=lambda *a: None), ComponentCache(PRECOMPILED).load(wasm))
    assert outcome.status == "start-failed" and "pie:inferlet/telemetry@0.2.0" in outcome.error


def test_import_problems_say_what_to_do():
    problems = unsupported_imports(["wasi:http/types@0.2.10", "pie:inferlet/runtime@0.1.0",
                                    "wasi:cli/stdout@0.2.12", "pie:inferlet/model@0.2.0", "acme:tools/search@1.0.0"])
    assert problems == [
        "acme:tools/search@1.0.0: not provided",
        "pie:inferlet/runtime@0.1.0: built against pie:inferlet@0.1.0, this host implements 0.2.0 "
        "(rebuild the inferlet with this pie-build)",
        "wasi:http/types@0.2.10: not provided (componentize-js adds it unless built with "
        "`-d http fetch-event`, which pie-build passes)",
    ]
