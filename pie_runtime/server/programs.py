"""Programs a server can launch: uploaded by clients (by content hash) or registered by the operator.

An upload is keyed by the sha256 of its bytes. The server checks the hash,
compiles the component once (the process-wide `ComponentCache`, which also
keeps the precompiled form on disk) and reads the manifest it declares. A
tenant sees only the programs it uploaded itself: asking "do you have X?"
never tells one tenant what another has run, even though equal bytes are
compiled and stored once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pie_client.protocol import ProtocolError
from pie_runtime.component_imports import check_imports
from pie_runtime.errors import PieError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.registry import Program

log = logging.getLogger("pie_runtime.server")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class StoredProgram:
    """A compiled program and what its manifest says (None: arguments pass unchecked, nothing granted)."""

    program: Program
    sha256: str | None  # None for operator-registered programs
    size: int
    manifest_error: str | None = None

    def describe(self) -> dict[str, Any]:
        manifest = self.program.manifest
        return {
            "name": self.program.name,
            "sha256": self.sha256,
            "size": self.size,
            "manifest": manifest.to_dict() if manifest is not None else None,
            "help": manifest.format_help() if manifest is not None else None,
            "manifest_error": self.manifest_error,
        }


@dataclass
class Upload:
    """An upload in progress on one connection."""

    tenant: str
    sha256: str
    size: int
    data: bytearray = field(default_factory=bytearray)


class ProgramStore:
    """Uploaded programs by hash (with the tenants that uploaded each) and registered ones by name."""

    def __init__(self, allow: Capabilities, max_bytes: int, max_programs: int = 256, cache: Any | None = None) -> None:
        from pie_runtime.component_cache import default_cache

        self.allow = allow
        self.max_bytes = max_bytes
        # Uploaded programs kept compiled; past it the least recently used is forgotten (its
        # tenants upload it again; running instances keep their own reference).
        self.max_programs = max_programs
        self.cache = cache if cache is not None else default_cache()
        self._by_hash: OrderedDict[str, StoredProgram] = OrderedDict()
        self._visible: dict[str, set[str]] = {}  # tenant -> hashes it uploaded
        self._by_name: dict[str, StoredProgram] = {}
        self._lock = threading.Lock()

    # ---- operator programs ------------------------------------------------------
    def register_file(self, name: str, path: Path) -> StoredProgram:
        """--program NAME=PATH: launchable by NAME by every tenant."""
        if not name:
            raise ValueError(f"--program {name}={path}: the name is empty")
        if name in self._by_name:
            raise ValueError(f"--program {name!r} is given twice")
        stored = self._by_name[name] = load_program_file(name, path, self.allow)
        return stored

    def named_or_file(self, name: str, ref: str) -> StoredProgram:
        """--expose NAME=PROGRAM: a --program name, or a file."""
        return self._by_name.get(ref) or load_program_file(name, Path(ref), self.allow)

    def registered(self) -> list[Program]:
        return [stored.program for stored in self._by_name.values()]

    # ---- lookups ----------------------------------------------------------------
    def has(self, tenant: str, sha256: str) -> StoredProgram | None:
        """The tenant's uploaded program with this hash, if it uploaded one."""
        sha256 = check_hash(sha256)
        with self._lock:
            if sha256 in self._visible.get(tenant, ()):
                self._by_hash.move_to_end(sha256)
                return self._by_hash[sha256]
        return None

    def resolve(self, tenant: str, ref: str) -> StoredProgram:
        """A program by the hash the tenant uploaded it under, or by a registered name."""
        if not isinstance(ref, str) or not ref:
            raise ProtocolError("bad-request", "program must be a sha256 or a registered program name")
        if SHA256_HEX.match(ref):
            found = self.has(tenant, ref)
            if found is not None:
                return found
        found = self._by_name.get(ref)
        if found is None:
            raise ProtocolError("not-found", f"no program {ref!r}: upload it first (has_program / upload_*), "
                                             f"or use a registered name ({', '.join(sorted(self._by_name)) or 'none'})")
        return found

    # ---- uploads ----------------------------------------------------------------
    def begin_upload(self, tenant: str, sha256: Any, size: Any) -> Upload:
        sha256 = check_hash(sha256)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ProtocolError("bad-request", f"size must be a positive integer, got {size!r}")
        if size > self.max_bytes:
            raise ProtocolError("too-large", f"the program is {size} bytes; this server takes at most "
                                             f"{self.max_bytes} bytes (--max-upload-mb)")
        return Upload(tenant, sha256, size)

    def add_chunk(self, upload: Upload, data: Any) -> int:
        if not isinstance(data, (bytes, bytearray)):
            raise ProtocolError("bad-request", "data must be binary")
        if len(upload.data) + len(data) > upload.size:
            raise ProtocolError("too-large", f"more bytes than the {upload.size} announced in upload_begin")
        upload.data += data
        return len(upload.data)

    def finish_upload(self, upload: Upload) -> StoredProgram:
        """Checks the bytes, compiles them once and makes the program visible to the tenant.
        Blocking (compiling takes seconds): call it off the event loop."""
        if len(upload.data) != upload.size:
            raise ProtocolError("invalid-argument", f"received {len(upload.data)} of the {upload.size} bytes announced")
        data = bytes(upload.data)
        actual = hashlib.sha256(data).hexdigest()
        if actual != upload.sha256:
            raise ProtocolError("invalid-argument", f"the bytes hash to {actual}, not {upload.sha256}")
        with self._lock:
            stored = self._by_hash.get(actual)
        if stored is None:
            stored = self._compile(actual, data)
        with self._lock:
            stored = self._by_hash.setdefault(actual, stored)
            self._by_hash.move_to_end(actual)
            self._visible.setdefault(upload.tenant, set()).add(actual)
            while len(self._by_hash) > self.max_programs:
                evicted, _ = self._by_hash.popitem(last=False)
                for hashes in self._visible.values():
                    hashes.discard(evicted)
        return stored

    def _compile(self, sha256: str, data: bytes) -> StoredProgram:
        from inferlet_toolchain.manifest import ManifestError, read_manifest_bytes

        try:
            component = self.cache.load(data)
        except Exception as e:  # noqa: BLE001 - wasmtime's message says what is wrong with the bytes
            raise ProtocolError("compile-failed", f"not a component this server can run: {e}") from None
        try:
            check_imports(component, self.cache.engine)
        except PieError as e:
            raise ProtocolError("compile-failed", e.message) from None
        manifest, manifest_error = None, None
        try:
            manifest = read_manifest_bytes(data)
        except ManifestError as e:
            manifest_error = f"{e}; its arguments pass unchecked and it is granted nothing"
        name = manifest.name if manifest is not None else f"program-{sha256[:12]}"
        grant = self.allow.grant(manifest.capabilities) if manifest is not None else Capabilities()
        log.info("program %s (%s, %d bytes) compiled", name, sha256[:12], len(data))
        return StoredProgram(Program(name, component, manifest, grant), sha256, len(data), manifest_error)


def load_program_file(name: str, path: Path, allow: Capabilities) -> StoredProgram:
    """A program from a .wasm file, an inferlet source (.py, .js: built with pie-build; both
    cached) or a bundled sample's name."""
    from inferlet_toolchain.bundled import program_path
    from inferlet_toolchain.manifest import ManifestError, read_manifest
    from pie_runtime.component_cache import default_cache, pie_home

    try:
        path = program_path(path, f"program {name!r}")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if path.suffix in (".py", ".js", ".mjs"):
        from inferlet_toolchain.build import build

        path = Path(build(path, output=pie_home() / "server-programs" / f"{name}.wasm", quiet=True))
    cache = default_cache()
    component = cache.load(path)
    try:
        check_imports(component, cache.engine)
    except PieError as e:
        raise ValueError(f"program {name!r}: {e.message}") from None
    try:
        manifest, error = read_manifest(path), None
    except ManifestError as e:
        manifest, error = None, f"{e}; its arguments pass unchecked and it is granted nothing"
    grant = allow.grant(manifest.capabilities) if manifest is not None else Capabilities()
    return StoredProgram(Program(name, component, manifest, grant), None, path.stat().st_size, error)


def check_hash(sha256: Any) -> str:
    if not isinstance(sha256, str) or not SHA256_HEX.match(sha256.lower()):
        raise ProtocolError("bad-request", f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()
