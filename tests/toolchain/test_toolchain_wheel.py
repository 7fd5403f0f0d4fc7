"""The package outside a checkout: build the wheel, install it into a fresh venv, run a sample from it.

The fresh venv gets the wheel itself (`pip install --no-deps`, not editable)
and sees the heavy dependencies (jax, wasmtime, componentize-py, ...) of the
test run's environment through a .pth file listing that environment's
site-packages: Python adds such a directory to the path without running the
.pth files inside it, so the test environment's editable install of this
repository stays inactive, and every `inferlet_toolchain` / `pie_runtime`
import comes from the wheel. No PYTHONPATH, and the working directory is not
the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.runtime.guests.fixtures import TEST_PIE_HOME

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from (pyproject.toml's packages, their linked data, the readme).
SOURCE_TREE = ("pyproject.toml", "README.md", "engine_jax", "pie_runtime", "inferlet_toolchain", "wit",
               "sample_inferlets")

pytestmark = pytest.mark.slow


def _run(command: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    process = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=timeout)
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{process.stdout}\n{process.stderr}"
    return process


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(bin directory of a fresh venv with the wheel installed, environment to run it in)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIE_HOME")}
    # Built from a copy of what the package is made of: an in-tree build would
    # leave build/ and *.egg-info in the checkout (and reuse stale ones).
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCE_TREE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", root / "dist", source], root, env)
    (wheel,) = (root / "dist").glob("pie_jax-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root, env)
    python = root / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], root, env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    return root / "venv" / "bin", env


def test_the_wheel_is_what_gets_imported(installed, tmp_path):
    bin_dir, env = installed
    out = _run([bin_dir / "python", "-c",
                "import inferlet_toolchain, pie_runtime; from inferlet_toolchain.wit_spec import find_wit_dir;"
                "from inferlet_toolchain.bundled import samples_dir;"
                "print(inferlet_toolchain.__file__, pie_runtime.__file__, find_wit_dir(), samples_dir(), sep='\\n')"],
               tmp_path, env).stdout.split()
    venv = str(bin_dir.parent)
    assert all(path.startswith(venv) for path in out), out
    assert not any(path.startswith(str(REPO)) for path in out), out


def test_pie_build_and_pie_run_work_from_the_installed_package(installed, tmp_path, small_model_dir):
    """pie-build finds the contract, the SDK and the sample in the package (a real build, empty cache);
    pie-run runs a bundled sample by name."""
    bin_dir, env = installed
    built = _run([bin_dir / "pie-build", "text_completion", "-o", tmp_path / "tc.wasm",
                  "--cache-dir", tmp_path / "build-cache"], tmp_path, env)
    assert Path(built.stdout.strip()) == tmp_path / "tc.wasm"
    help_text = _run([bin_dir / "pie-run", "tc.wasm", "--", "--help"], tmp_path, env).stdout
    assert "--prompt STR" in help_text and "text-completion" in help_text
    model = small_model_dir("mistral")
    args = ["--model", model, "--page-size", "4", "--kv-pages", "64", "-q", "--",
            "--prompt", "Once upon a time", "--max-tokens", "8"]
    run_env = {**env, "PIE_HOME": str(TEST_PIE_HOME)}
    by_name = _run([bin_dir / "pie-run", "text_completion", *args], tmp_path, run_env).stdout
    built_one = _run([bin_dir / "pie-run", "tc.wasm", *args], tmp_path, run_env).stdout
    # The checkout's pie-run, for comparison.
    checkout = _run([sys.executable, "-m", "pie_runtime.cli", REPO / "sample_inferlets" / "text_completion.py",
                     *args], REPO, {**run_env, "PYTHONPATH": str(REPO)}).stdout
    assert by_name == built_one == checkout and checkout.strip()
