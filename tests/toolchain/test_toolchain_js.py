"""pie-build for JavaScript: the toolchain, declarations, and the JS SDK inside a real guest.

These need Node.js and npm (the toolchain is installed with `npm ci` into the
tests' PIE_HOME on first use); without them they fail with the error that
says so. The samples' end-to-end tests are in tests/samples/test_js_samples.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inferlet_toolchain.build import BuildError, build
from inferlet_toolchain.inferlet.sampling import Sampler
from inferlet_toolchain.manifest import ManifestError, read_manifest
from inferlet_toolchain.wit_spec import wit_functions
from tests.runtime.guests.fixtures import PRECOMPILED, TEST_PIE_HOME

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def js_pie_home():
    """The JavaScript toolchain installs into the tests' PIE_HOME (kept across sessions)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PIE_HOME", str(TEST_PIE_HOME))
    yield
    mp.undo()


def test_without_node_the_build_says_what_is_missing(tmp_path, monkeypatch):
    app = tmp_path / "app.js"
    app.write_text("import { declare } from 'inferlet';\ndeclare({ name: 'x' });\nexport function main() {}\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BuildError, match=r"needs Node.js 18 or newer and npm, and `node` is not on PATH"):
        build(app, tmp_path / "x.wasm", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("source, line, message", [
    ("export function main() {}\n", 1, "no module-level `declare"),
    ("import { declare } from 'inferlet';\nconst n = 'x';\ndeclare({ name: n });\nexport function main() {}\n",
     3, "literal values only"),
    ("import * as inferlet from 'inferlet';\n\ninferlet.declare({ name: 'x', arguments: [{ name: 'n', type: 'matrix' }] });\n"
     "export function main() {}\n", 3, "type must be one of"),
    ("import { declare } from 'inferlet';\ndeclare({ name: 'x', colour: 'red' });\nexport function main() {}\n",
     2, "unknown manifest field(s): colour"),
    ("import { declare } from 'inferlet';\ndeclare({ name: 'x' });\nfunction main() {}\n", 1, "does not export `main`"),
    ("import { declare } from 'inferlet';\ndeclare({ name: 'x' ;\n", 2, ""),
])
def test_declaration_errors_point_at_the_line(tmp_path, source, line, message):
    app = tmp_path / "app.js"
    app.write_text(source)
    with pytest.raises(ManifestError) as caught:
        build(app, tmp_path / "x.wasm", cache_dir=tmp_path / "cache", quiet=True)
    assert caught.value.filename == str(app) and caught.value.line == line, str(caught.value)
    assert message in caught.value.reason


def test_the_sdk_in_a_guest_matches_the_contract(tmp_path):
    """Inside a real component: every function of wit/ is in the SDK's binding
    table and is a function in componentize-js's bindings; a refused call is an
    InferletError with the contract's code; seeds match the Python SDK's."""
    from pie_runtime.component_cache import ComponentCache
    from pie_runtime.host.registry import Host
    from tests.runtime.guests.fixtures import run

    wasm = build(HERE / "js" / "contract_check.js", tmp_path / "check.wasm", quiet=True)
    assert read_manifest(wasm).name == "contract-check"
    outcome = run(Host([], guest_output=lambda *a: None), ComponentCache(PRECOMPILED).load(wasm), "--seed=7")
    assert outcome.ok, outcome.describe()
    report = json.loads(outcome.value)
    wit = {f for f in wit_functions() if f[0] != "run"}
    assert {tuple(name) for name in report["names"]} == wit
    assert report["missing"] == []
    assert report["refused"] == "invalid-argument"
    assert report["seeds"] == [str(Sampler(seed=7).step_seed(step)) for step in (0, 1, 2, 1000)]


def test_an_unchanged_rebuild_is_the_same_component(tmp_path):
    """componentize-js is not reproducible; the build cache keeps equal sources equal components,
    so the precompiled cache hits."""
    first = build(HERE / "js" / "contract_check.js", tmp_path / "a.wasm", quiet=True)
    second = build(HERE / "js" / "contract_check.js", tmp_path / "b.wasm", quiet=True)
    assert first.read_bytes() == second.read_bytes()
    assert os.path.getsize(first) > 1_000_000
