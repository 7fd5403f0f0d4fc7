"""The wasmtime Engine every instance shares, and a cache of precompiled components.

Compiling an 18 MB componentize-py component takes seconds; deserializing its
precompiled form (``Component.serialize``) takes milliseconds. So a component
is compiled once per (wasm bytes, wasmtime version, engine settings) and the
result is kept under ``$PIE_HOME/precompiled`` (default ``~/.cache/pie``),
plus an in-process table so a second launch of the same program in one
server does not even touch the disk.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime
from wasmtime.component import Component

# Settings that change the compiled code are part of the cache key, so a change
# here can never load a stale artifact built under different settings.
_ENGINE_SETTINGS = "epoch_interruption=1"

_engine_lock = threading.Lock()
_engine: wasmtime.Engine | None = None


def shared_engine() -> wasmtime.Engine:
    """The process-wide wasmtime Engine: epoch interruption on (CPU limits need it)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            _engine = wasmtime.Engine(config)
        return _engine


def wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def pie_home() -> Path:
    """Root of Pie's on-disk caches: $PIE_HOME, else ~/.cache/pie."""
    env = os.environ.get("PIE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "pie"


def cache_key(wasm: bytes) -> str:
    """sha256 over the component bytes, the wasmtime version and the engine settings."""
    h = hashlib.sha256()
    h.update(wasm)
    h.update(f"\0wasmtime={wasmtime_version()}\0{_ENGINE_SETTINGS}".encode())
    return h.hexdigest()


@dataclass
class CacheStats:
    """How loads were served; tests and benchmarks read these."""

    compiled: int = 0  # cache misses: compiled from wasm and written to disk
    deserialized: int = 0  # served from the on-disk precompiled file
    memory_hits: int = 0  # served from this process's table
    last_source: str = ""  # "compiled" | "deserialized" | "memory"
    last_seconds: float = 0.0
    history: list[tuple[str, float]] = field(default_factory=list)


class ComponentCache:
    """Loads components for the shared engine, compiling each distinct wasm at most once."""

    def __init__(self, directory: Path | None = None, *, engine: wasmtime.Engine | None = None,
                 in_memory: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else pie_home() / "precompiled"
        self.engine = engine if engine is not None else shared_engine()
        self.in_memory = in_memory
        self.stats = CacheStats()
        self._memory: dict[str, Component] = {}
        self._keys: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def load(self, wasm_or_path: bytes | str | os.PathLike[str]) -> Component:
        """The compiled component for a .wasm file (or its bytes)."""
        start = time.perf_counter()
        stamp: tuple[str, int, int] | None = None
        if isinstance(wasm_or_path, (bytes, bytearray)):
            wasm: bytes | None = bytes(wasm_or_path)
            key = cache_key(wasm)
        else:
            path = Path(wasm_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"no such component: {path}")
            st = path.stat()
            # Hashing 18 MB costs tens of ms: a file unchanged since we last
            # hashed it (same path, size, mtime) keeps its key.
            stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            key = self._keys.get(stamp) if self.in_memory else None
            wasm = None
            if key is None:
                wasm = path.read_bytes()
                key = cache_key(wasm)
        # One lock for all loads: two threads launching the same new program
        # must not both spend seconds compiling it.
        with self._lock:
            component = self._memory.get(key) if self.in_memory else None
            if component is not None:
                source = "memory"
            else:
                if wasm is None:
                    wasm = Path(wasm_or_path).read_bytes()  # type: ignore[arg-type]
                    key = cache_key(wasm)
                component, source = self._load_uncached(key, wasm)
                if self.in_memory:
                    self._memory[key] = component
            if stamp is not None and self.in_memory:
                self._keys[stamp] = key
            elapsed = time.perf_counter() - start
            self._record(source, elapsed)
        return component

    def _load_uncached(self, key: str, wasm: bytes) -> tuple[Component, str]:
        artifact = self.directory / f"{key}.cwasm"
        if artifact.is_file():
            try:
                return Component.deserialize_file(self.engine, str(artifact)), "deserialized"
            except wasmtime.WasmtimeError:
                # Truncated or written by an incompatible build: recompile over it.
                pass
        component = Component(self.engine, wasm)
        self._write_atomically(artifact, component.serialize())
        return component, "compiled"

    def _write_atomically(self, artifact: Path, data: bytes | bytearray) -> None:
        # A concurrent reader (another pie-run) must never see a half-written file.
        try:
            artifact.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=artifact.parent, prefix=".tmp-", suffix=".cwasm")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, artifact)
        except OSError:
            # A read-only cache directory only costs speed on the next launch.
            pass

    def _record(self, source: str, seconds: float) -> None:
        s = self.stats
        if source == "compiled":
            s.compiled += 1
        elif source == "deserialized":
            s.deserialized += 1
        else:
            s.memory_hits += 1
        s.last_source, s.last_seconds = source, seconds
        s.history.append((source, seconds))


_default_cache: ComponentCache | None = None
_default_lock = threading.Lock()


def default_cache() -> ComponentCache:
    global _default_cache
    with _default_lock:
        if _default_cache is None:
            _default_cache = ComponentCache()
        return _default_cache


def load_component(path: bytes | str | os.PathLike[str]) -> Component:
    """Loads a component through the process-wide cache (compiled at most once per content)."""
    return default_cache().load(path)
