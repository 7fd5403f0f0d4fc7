"""pie-build for JavaScript: an inferlet module -> a WebAssembly component with its manifest.

Steps: read the module's `declare({...})` statically (`js/manifest.mjs`,
nothing of the inferlet runs on the host), bundle it with its local imports
and the SDK (`js/sdk/`, imported as `inferlet`) into one ES module with
esbuild, compile the bundle with componentize-js against the contract
(`wit/`, world `inferlet`, without wasi:http), embed the manifest, and cache
the result by a hash of the bundle, the contract, the manifest and the
toolchain: an unchanged rebuild copies the cached component (componentize-js
itself is not reproducible: its snapshot of the JavaScript heap differs from
run to run, so equal sources stay equal components only through this cache).

The toolchain (node packages pinned by `js/package-lock.json`) is installed
with `npm ci` on first use into $PIE_HOME/js/, with a message: it is ~400 MB.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from .manifest import Manifest, ManifestError, embed
from .wit_spec import find_wit_dir

JS_DIR = Path(__file__).resolve().parent / "js"
SDK_DIR = JS_DIR / "sdk"
_SCRIPTS = ("build.mjs", "manifest.mjs")
_LOCK_FILES = ("package.json", "package-lock.json")
# Bump to invalidate every cached JavaScript build when the steps change.
_BUILD_FORMAT = "pie-build-js/1"
# JavaScript names of argument types, as the manifest spells them.
_ARG_TYPES = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"}


class ToolchainError(Exception):
    """Node.js, npm or the toolchain install is missing or failed; the message says what to do."""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ToolchainError(
            f"building a JavaScript inferlet needs Node.js 18 or newer and npm, and `{name}` is not on PATH "
            "(install them, e.g. `apt-get install nodejs npm`, or from https://nodejs.org)")
    return found


def _pie_home() -> Path:
    home = os.environ.get("PIE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "pie"


def toolchain_id() -> str:
    """Hash of the pinned toolchain (package.json and its lock file)."""
    digest = hashlib.sha256()
    for name in _LOCK_FILES:
        digest.update((JS_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two pie-builds installing at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_toolchain() -> Path:
    """The installed toolchain's directory (node_modules inside), installed now if missing."""
    _tool("node")
    root = _pie_home() / "js"
    target = root / f"toolchain-{toolchain_id()}"
    marker = target / ".installed"
    if marker.is_file():
        return target
    npm = _tool("npm")
    with _locked(root / ".install.lock"):
        if marker.is_file():
            return target
        print(f"pie-build: installing the JavaScript toolchain (componentize-js, esbuild, oxc-parser; about 400 MB) "
              f"into {target} with npm ci; this happens once ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix="install-", dir=root))
        try:
            for name in _LOCK_FILES:
                shutil.copyfile(JS_DIR / name, staging / name)
            process = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=staging,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if process.returncode != 0:
                raise ToolchainError(f"npm ci failed (exit {process.returncode}) installing the JavaScript "
                                     f"toolchain:\n{process.stdout.strip()}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        marker.write_text(toolchain_id(), encoding="utf-8")
        print(f"pie-build: JavaScript toolchain installed in {time.perf_counter() - started:.0f}s",
              file=sys.stderr, flush=True)
    return target


def _scripts(toolchain: Path) -> Path:
    """A copy of our node scripts next to the toolchain's node_modules (so their imports resolve)."""
    digest = hashlib.sha256(b"".join((JS_DIR / name).read_bytes() for name in _SCRIPTS)).hexdigest()[:12]
    folder = toolchain / f"scripts-{digest}"
    if not all((folder / name).is_file() for name in _SCRIPTS):
        staging = Path(tempfile.mkdtemp(prefix="scripts-", dir=toolchain))
        for name in _SCRIPTS:
            shutil.copyfile(JS_DIR / name, staging / name)
        try:
            os.replace(staging, folder)
        except OSError:  # another build put it there first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _node(scripts: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("node"), str(scripts / script), *args], capture_output=True, text=True)


def read_declaration(source: Path, scripts: Path) -> Manifest:
    """The manifest a JavaScript inferlet declares (ManifestError at file:line when it is wrong)."""
    process = _node(scripts, "manifest.mjs", str(source))
    if process.returncode != 0:
        detail = process.stderr.strip()
        prefix = f"{source}:"
        if detail.startswith(prefix):
            line, _, message = detail[len(prefix):].partition(": ")
            if line.isdigit():
                raise ManifestError(message, filename=str(source), line=int(line))
        raise ManifestError(detail or f"reading the declaration failed (exit {process.returncode})",
                            filename=str(source))
    found = json.loads(process.stdout)
    declared, line = found["declaration"], found["line"]
    try:
        if isinstance(declared.get("arguments"), list):
            for spec in declared["arguments"]:
                if isinstance(spec, dict) and spec.get("type") in _ARG_TYPES:
                    spec["type"] = _ARG_TYPES[spec["type"]]
        return Manifest.from_dict(declared)
    except ManifestError as error:
        raise ManifestError(error.reason, filename=str(source), line=line) from None


def build_js(source: Path, output: Optional[Path], cache: Path, *, quiet: bool, use_cache: bool) -> tuple[Path, Path]:
    """Builds a JavaScript inferlet; (cached component, default output path). Raises
    ToolchainError, ManifestError or RuntimeError (bundling or compiling failed)."""
    toolchain = ensure_toolchain()
    scripts = _scripts(toolchain)
    manifest = read_declaration(source, scripts)
    wit_dir = find_wit_dir()
    with tempfile.TemporaryDirectory(prefix="stage-js-", dir=cache) as scratch:
        bundle = Path(scratch) / "bundle.js"
        process = _node(scripts, "build.mjs", "bundle", str(source.resolve()), str(SDK_DIR), str(bundle))
        if process.returncode != 0:
            raise RuntimeError(f"bundling {source} failed:\n{process.stderr.strip()}")
        digest = hashlib.sha256()
        for label, data in (("format", _BUILD_FORMAT.encode()), ("toolchain", toolchain_id().encode()),
                            ("bundle", bundle.read_bytes()), ("manifest", manifest.to_json().encode()),
                            *((f"wit:{w.name}", w.read_bytes()) for w in sorted(wit_dir.glob("*.wit")))):
            digest.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        cached = cache / f"{digest.hexdigest()}.wasm"
        if use_cache and cached.is_file():
            if not quiet:
                print(f"pie-build: {source} unchanged, using the cached build", file=sys.stderr)
        else:
            if not quiet:
                print(f"pie-build: compiling {source.name} with componentize-js ...", file=sys.stderr, flush=True)
            raw = Path(scratch) / "component.wasm"
            process = _node(scripts, "build.mjs", "componentize", str(bundle), str(wit_dir), str(raw))
            if process.returncode != 0:
                raise RuntimeError(f"componentize-js failed on {source}:\n{process.stderr.strip()}")
            partial = Path(scratch) / "embedded.wasm"
            partial.write_bytes(embed(raw.read_bytes(), manifest))
            os.replace(partial, cached)
    default = Path.cwd() / f"{manifest.name}.wasm"
    return cached, (Path(output) if output is not None else default)
