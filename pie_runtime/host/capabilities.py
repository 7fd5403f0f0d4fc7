"""Capability policy: what outside access an instance gets (files, launching children; never the network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

NETWORK_REFUSED = (
    "network access cannot be granted: wasmtime-py 50's WASI configuration can only hand a guest the "
    "host's whole network (wasi_config_inherit_network), with no way to limit it to listed host:port "
    "pairs, so pie-run refuses rather than grant more than was asked")


@dataclass(frozen=True)
class Capabilities:
    """Outside access an instance gets: what the operator allows, met with what the inferlet declares.

    - `fs`: host directories preopened read-only, at the same path inside
      the guest (operator: `fs:DIR`); `fs_rw`: read and write (`fs-rw:DIR`).
      An inferlet declaring "filesystem" gets them all; no other path exists
      for it.
    - `launch`: `runtime.launch` (operator: `launch`); children run on this
      server under the launch tree's limits (`pie_runtime.limits`).
    - Network: never. See `NETWORK_REFUSED`.
    """

    fs: tuple[str, ...] = ()
    fs_rw: tuple[str, ...] = ()
    launch: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> "Capabilities":
        """Parses the operator's `--allow` value, e.g. ``fs:/data,fs-rw:/scratch,launch``."""
        read_only, read_write, launch = [], [], False
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            kind, _, path = item.partition(":")
            if kind == "launch" and not path:
                launch = True
            elif kind in ("net", "network"):
                raise ValueError(f"--allow {item}: {NETWORK_REFUSED}")
            elif kind in ("fs", "fs-rw") and path:
                directory = Path(path).expanduser().resolve()
                if not directory.is_dir():
                    raise ValueError(f"--allow {item}: {directory} is not a directory")
                (read_write if kind == "fs-rw" else read_only).append(str(directory))
            else:
                raise ValueError(f"unknown capability {item!r}; expected 'fs:DIR' (read-only), "
                                 "'fs-rw:DIR' (read and write) or 'launch'")
        read_only = [d for d in read_only if d not in read_write]
        return cls(fs=tuple(dict.fromkeys(read_only)), fs_rw=tuple(dict.fromkeys(read_write)), launch=launch)

    def grant(self, declared: Iterable[str]) -> "Capabilities":
        """What an inferlet declaring `declared` actually gets: never more than either side."""
        # Manifests name them "filesystem"/"launch" (inferlet_toolchain.manifest).
        aliases = {"filesystem": "fs"}
        kinds = {aliases.get(k, k) for k in (str(d).split(":", 1)[0].strip() for d in declared)}
        files = "fs" in kinds
        return Capabilities(fs=self.fs if files else (), fs_rw=self.fs_rw if files else (),
                            launch=self.launch and "launch" in kinds)

    def describe(self) -> str:
        parts = ([f"fs:{d}" for d in self.fs] + [f"fs-rw:{d}" for d in self.fs_rw]
                 + (["launch"] if self.launch else []))
        return ",".join(parts) or "none"

