"""The wasmtime Engine every instance shares, and a cache of precompiled components.

Compiling an 18 MB componentize-py component takes seconds; deserializing its
precompiled form (``Component.serialize``) takes milliseconds. So a component
is compiled once per (code, wasmtime version, engine settings) and the
result is kept under ``$PIE_HOME/precompiled`` (default ``~/.cache/pie``),
plus an in-process table so a second launch of the same program in one
server does not even touch the disk.

The key hashes the component without its `pie-manifest` section (the
manifest is read from the .wasm, never from compiled code), so a component
whose manifest alone changed reuses its compiled code. Both tiers are
bounded: the directory to `max_bytes` (default 2 GiB, or
$PIE_PRECOMPILED_MAX_MB), the table to `max_in_memory` components; the least
recently used go first (on disk, a file's mtime is its last use).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime
from wasmtime.component import Component

log = logging.getLogger("pie_runtime.component_cache")

# Settings that change the compiled code are part of the cache key, so a change
# here can never load a stale artifact built under different settings.
_ENGINE_SETTINGS = "epoch_interruption=1"

DEFAULT_MAX_BYTES = 2 << 30
DEFAULT_MAX_IN_MEMORY = 32

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


def code_bytes(wasm: bytes) -> bytes:
    """`wasm` without its top-level `pie-manifest` sections: what compiles.
    Anything that does not parse as a component is returned unchanged
    (wasmtime then reports what is wrong with it)."""
    from inferlet_toolchain.manifest import ManifestError, without_manifest

    try:
        return without_manifest(wasm)
    except ManifestError:
        return wasm


def cache_key(wasm: bytes) -> str:
    """sha256 over the component's code (manifest left out), the wasmtime version and the engine settings."""
    h = hashlib.sha256()
    h.update(code_bytes(wasm))
    h.update(f"\0wasmtime={wasmtime_version()}\0{_ENGINE_SETTINGS}".encode())
    return h.hexdigest()


def _max_bytes_from_env() -> int:
    value = os.environ.get("PIE_PRECOMPILED_MAX_MB")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        return max(0, int(value)) << 20
    except ValueError:
        raise ValueError(f"PIE_PRECOMPILED_MAX_MB={value!r} is not a whole number of MiB") from None


@dataclass
class CacheStats:
    """How loads were served; tests and benchmarks read these."""

    compiled: int = 0  # cache misses: compiled from wasm and written to disk
    deserialized: int = 0  # served from the on-disk precompiled file
    memory_hits: int = 0  # served from this process's table
    evicted: int = 0  # artifacts deleted from the directory to stay within max_bytes
    last_source: str = ""  # "compiled" | "deserialized" | "memory"
    last_seconds: float = 0.0
    history: list[tuple[str, float]] = field(default_factory=list)


class ComponentCache:
    """Loads components for the shared engine, compiling each distinct wasm at most once."""

    def __init__(self, directory: Path | None = None, *, engine: wasmtime.Engine | None = None,
                 in_memory: bool = True, max_bytes: int | None = None,
                 max_in_memory: int = DEFAULT_MAX_IN_MEMORY) -> None:
        self.directory = Path(directory) if directory is not None else pie_home() / "precompiled"
        self.engine = engine if engine is not None else shared_engine()
        self.in_memory = in_memory
        self.max_bytes = _max_bytes_from_env() if max_bytes is None else max_bytes
        self.max_in_memory = max_in_memory
        self.stats = CacheStats()
        self._memory: OrderedDict[str, Component] = OrderedDict()
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
                self._memory.move_to_end(key)
            else:
                if wasm is None:
                    wasm = Path(wasm_or_path).read_bytes()  # type: ignore[arg-type]
                    key = cache_key(wasm)
                component, source = self._load_uncached(key, wasm)
                if self.in_memory:
                    self._memory[key] = component
                    while len(self._memory) > self.max_in_memory:
                        self._memory.popitem(last=False)
            if stamp is not None and self.in_memory:
                self._keys[stamp] = key
            elapsed = time.perf_counter() - start
            self._record(source, elapsed)
        return component

    def _load_uncached(self, key: str, wasm: bytes) -> tuple[Component, str]:
        artifact = self.directory / f"{key}.cwasm"
        if artifact.is_file():
            try:
                component = Component.deserialize_file(self.engine, str(artifact))
                os.utime(artifact)  # used now: the last to be evicted
                return component, "deserialized"
            except (wasmtime.WasmtimeError, OSError):
                # Truncated, written by an incompatible build, or evicted by
                # another process meanwhile: recompile over it.
                pass
        component = Component(self.engine, wasm)
        self._write_atomically(artifact, component.serialize())
        self._evict(keep=artifact)
        return component, "compiled"

    def _evict(self, keep: Path) -> None:
        """Deletes the least recently used artifacts until the directory fits in
        `max_bytes` (never `keep`, the one just written)."""
        try:
            entries = []
            for path in self.directory.glob("*.cwasm"):
                st = path.stat()
                entries.append((st.st_mtime_ns, st.st_size, path))
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                path.unlink()
            except OSError:  # another process evicted it first
                continue
            total -= size
            self.stats.evicted += 1
            log.info("precompiled cache over %d MiB: evicted %s", self.max_bytes >> 20, path.name)

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
