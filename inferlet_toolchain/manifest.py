"""The inferlet manifest: what an inferlet is, the arguments it takes, the
capabilities it needs.

pie-build extracts it from the source's `inferlet.declare(...)` call and
embeds it as JSON in a custom section named `pie-manifest` at the end of the
component; the host reads it back without instantiating anything
(`read_manifest`), shows `format_help()`, validates a launch's arguments
with `parse_cli()` and grants exactly the declared capabilities.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .inferlet.args import MISSING, ArgSpec, ArgumentError, canonical, initial_value, parse

SECTION_NAME = "pie-manifest"
# Bumped when the JSON layout changes incompatibly.
FORMAT_VERSION = 1

# Capabilities an inferlet may ask for; the operator decides what to grant.
CAPABILITIES: dict[str, str] = {
    "messaging": "exchange messages with the launching client",
    "broadcast": "publish and subscribe to topics shared with other inferlets",
    "kvstore": "read and write the user's key-value store",
    "persistent-exports": "export KV pages that outlive the instance",
    "filesystem": "read files the operator maps into the sandbox",
    "network": "open network connections",
    "launch": "start child instances of itself or of programs the operator registered",
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")

_MAGIC = b"\x00asm"
# Preamble of a component (version 0x0d, layer 1) vs a core module (version 1, layer 0).
_COMPONENT_PREAMBLE = _MAGIC + b"\x0d\x00\x01\x00"


class ManifestError(ValueError):
    """A manifest that does not make sense; the message says where and why."""

    def __init__(self, message: str, *, filename: Optional[str] = None, line: Optional[int] = None) -> None:
        self.filename = filename
        self.line = line
        self.reason = message
        where = ""
        if filename is not None:
            where = f"{filename}:{line}: " if line is not None else f"{filename}: "
        super().__init__(f"{where}{message}")


class HelpRequested(Exception):
    """`--help` was given; `text` is the help to show."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass
class Manifest:
    name: str
    version: str = "0.1.0"
    description: str = ""
    arguments: list[ArgSpec] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)

    def validate(self, filename: Optional[str] = None, line: Optional[int] = None) -> None:
        """Raises ManifestError (located at filename:line when given) if invalid."""

        def fail(message: str) -> None:
            raise ManifestError(message, filename=filename, line=line)

        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            fail(f"name {self.name!r} must be lowercase letters, digits and '-' (e.g. 'text-completion')")
        if not isinstance(self.version, str) or not _VERSION_RE.match(self.version):
            fail(f"version {self.version!r} must be a semantic version like '0.1.0'")
        if not isinstance(self.description, str):
            fail("description must be a string")
        seen: set[str] = set()
        for spec in self.arguments:
            try:
                spec.check()
            except ArgumentError as error:
                fail(str(error))
            if spec.name in ("help", "h"):
                fail(f"argument name {spec.name!r} is reserved for --help")
            if spec.name in seen or spec.attr in {s.replace("-", "_") for s in seen}:
                fail(f"argument {spec.name!r} is declared twice")
            seen.add(spec.name)
        for capability in self.capabilities:
            if capability not in CAPABILITIES:
                fail(f"unknown capability {capability!r} (known: {', '.join(CAPABILITIES)})")
        if len(set(self.capabilities)) != len(self.capabilities):
            fail("a capability is listed twice")

    # JSON ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "arguments": [spec.to_json() for spec in self.arguments],
            "capabilities": list(self.capabilities),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError("a manifest is a JSON object")
        if data.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise ManifestError(f"manifest format {data.get('format')} is not supported (expected {FORMAT_VERSION})")
        unknown = set(data) - {"format", "name", "version", "description", "arguments", "capabilities"}
        if unknown:
            raise ManifestError(f"unknown manifest field(s): {', '.join(sorted(unknown))}")
        if "name" not in data:
            raise ManifestError("the manifest has no name")
        try:
            arguments = [ArgSpec.from_json(a) for a in data.get("arguments", [])]
        except (ArgumentError, TypeError, AttributeError) as error:
            raise ManifestError(f"bad argument in manifest: {error}") from None
        manifest = cls(
            name=data["name"],
            version=data.get("version", "0.1.0"),
            description=data.get("description", ""),
            arguments=arguments,
            capabilities=list(data.get("capabilities", [])),
        )
        manifest.validate()
        return manifest

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "Manifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"the manifest is not valid JSON: {error}") from None
        return cls.from_dict(data)

    # Arguments -----------------------------------------------------------
    def parse_args(self, argv: list[str]) -> dict[str, Any]:
        """{name: value} for every declared argument (HelpRequested on --help)."""
        if "--help" in argv or "-h" in argv:
            raise HelpRequested(self.format_help())
        try:
            return parse(self.arguments, list(argv))
        except ArgumentError as error:
            raise ArgumentError(f"{self.name}: {error}") from None

    def parse_cli(self, argv: list[str]) -> list[str]:
        """Validates `argv` against the declared arguments; returns the
        canonical list (`--name=value`, defaults filled in, declaration order)
        that the host passes to the instance as `runtime.arguments()`.

        Raises ArgumentError with a clear message, or HelpRequested on --help.
        """
        return canonical(self.arguments, self.parse_args(argv))

    def format_help(self, prog: Optional[str] = None) -> str:
        """Usage text built from the declaration."""
        prog = prog or self.name
        lines = [f"usage: {prog} [options]" if self.arguments else f"usage: {prog}", ""]
        lines.append(f"{self.name} {self.version}" + (f": {self.description}" if self.description else ""))
        if self.arguments:
            lines += ["", "options:"]
            rows = []
            for spec in self.arguments:
                flag = f"--{spec.name}" if spec.type == "bool" else f"--{spec.name} {spec.type.upper()}"
                notes = []
                if spec.required:
                    notes.append("required")
                elif spec.default is not MISSING and spec.type != "bool":
                    notes.append(f"default: {initial_value(spec)!r}")
                elif spec.type == "bool":
                    notes.append(f"default: {'on' if initial_value(spec) else 'off'}; --no-{spec.name} to unset")
                text = spec.help + (f" ({'; '.join(notes)})" if notes else "")
                rows.append((flag, text))
            width = max(len(flag) for flag, _ in rows) + 2
            lines += [f"  {flag.ljust(width)}{text}".rstrip() for flag, text in rows]
        if self.capabilities:
            lines += ["", "capabilities: " + ", ".join(self.capabilities)]
        return "\n".join(lines) + "\n"


# Component binary ------------------------------------------------------------

def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_leb128(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ManifestError("truncated LEB128 number in the component")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 35:
            raise ManifestError("LEB128 number too long in the component")


def _sections(data: bytes) -> list[tuple[int, int, int, Optional[str], int]]:
    """Top-level sections: (id, start, end, custom name or None, payload start)."""
    if data[:8] != _COMPONENT_PREAMBLE:
        if data[:4] == _MAGIC:
            raise ManifestError("this is a core Wasm module, not a component (built by pie-build?)")
        raise ManifestError("not a WebAssembly component")
    pos = 8
    out = []
    while pos < len(data):
        start = pos
        section_id = data[pos]
        size, pos = _read_leb128(data, pos + 1)
        end = pos + size
        if end > len(data):
            raise ManifestError("truncated section in the component")
        name = None
        payload = pos
        if section_id == 0:
            name_len, name_pos = _read_leb128(data, pos)
            name = data[name_pos:name_pos + name_len].decode("utf-8", "replace")
            payload = name_pos + name_len
        out.append((section_id, start, end, name, payload))
        pos = end
    return out


def without_manifest(component: bytes) -> bytes:
    """`component` without its manifest sections (ManifestError if it is not a component)."""
    kept = bytearray(component[:8])
    for _, start, end, name, _ in _sections(component):
        if name != SECTION_NAME:
            kept += component[start:end]
    return bytes(kept)


def embed(component: bytes, manifest: Manifest) -> bytes:
    """`component` with its manifest section replaced by `manifest`'s."""
    kept = without_manifest(component)
    name_bytes = SECTION_NAME.encode("utf-8")
    body = _leb128(len(name_bytes)) + name_bytes + manifest.to_json().encode("utf-8")
    return kept + b"\x00" + _leb128(len(body)) + body


def read_manifest_bytes(component: bytes) -> Manifest:
    for _, _, end, name, payload in _sections(component):
        if name == SECTION_NAME:
            return Manifest.from_json(component[payload:end])
    raise ManifestError(f"the component has no {SECTION_NAME!r} section (not built by pie-build?)")


def load_manifest_file(path: Union[str, Path]) -> Manifest:
    """A manifest written by hand for a component built elsewhere: a TOML or
    JSON file with the embedded manifest's fields (docs/writing-inferlets.md):

        name = "my-inferlet"            # required: lowercase words joined by '-'
        version = "0.1.0"               # semantic version (default 0.1.0)
        description = "What it does."
        capabilities = ["launch"]       # from CAPABILITIES (default none)

        [[arguments]]                   # one table per argument, in order
        name = "prompt"                 # --prompt
        type = "str"                    # str, int, float or bool (default str)
        default = "Hello"               # optional; or `required = true`
        help = "Text to complete."
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ManifestError("a manifest file is .toml or .json", filename=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read the manifest file: {error}", filename=str(path)) from None
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ManifestError(f"not valid TOML: {error}", filename=str(path)) from None
    else:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ManifestError(f"not valid JSON: {error}", filename=str(path), line=getattr(error, "lineno", None)) from None
    try:
        return Manifest.from_dict(data)
    except ManifestError as error:
        raise ManifestError(error.reason, filename=str(path)) from None


def read_manifest(wasm_path: Union[str, Path]) -> Manifest:
    """The manifest embedded in a built inferlet, read without instantiating it."""
    path = Path(wasm_path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ManifestError(f"cannot read {path}: {error.strerror}") from None
    try:
        return read_manifest_bytes(data)
    except ManifestError as error:
        raise ManifestError(error.reason, filename=str(path)) from None
