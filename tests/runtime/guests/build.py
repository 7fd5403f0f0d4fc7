"""Builds the test guests with componentize-py, cached by content so a test session builds each at most once.

The guests are written against the raw bindings generated from wit/ (no SDK),
so they test the host alone. The cache key covers the guest source, the WIT
contract and the componentize-py version: editing any of them rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
REPO = GUESTS.parents[2]
WIT = REPO / "wit"

_lock = threading.Lock()


def componentize_py() -> str:
    exe = Path(sys.executable).parent / "componentize-py"
    if exe.exists():
        return str(exe)
    found = shutil.which("componentize-py")
    if found is None:
        raise RuntimeError("componentize-py is not installed")
    return found


def _key(name: str, wit_dir: Path, world: str) -> str:
    h = hashlib.sha256()
    h.update((GUESTS / f"{name}.py").read_bytes())
    h.update(world.encode())
    for wit in sorted(wit_dir.glob("*.wit")):
        h.update(wit.read_bytes())
    h.update(subprocess.run([componentize_py(), "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:24]


def build_guest(name: str, cache_dir: Path | None = None, *, wit_dir: Path = WIT, world: str = "inferlet") -> Path:
    """The .wasm of tests/runtime/guests/<name>.py built against `world` of `wit_dir`, built if not cached."""
    cache = cache_dir or Path(os.environ.get("PIE_TEST_GUEST_CACHE", Path(tempfile.gettempdir()) / "pie-test-guests"))
    with _lock:
        out = cache / f"{name}-{_key(name, wit_dir, world)}.wasm"
        if out.exists():
            return out
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        proc = subprocess.run(
            [componentize_py(), "-d", str(wit_dir), "-w", world, "componentize", "-p", str(GUESTS), name,
             "-o", str(tmp)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building guest {name} failed:\n{proc.stdout}\n{proc.stderr}")
        os.replace(tmp, out)
        return out
