"""The sample inferlets the toolchain ships with, found by name.

In a checkout they are the repository's `sample_inferlets/`; an installed
package carries them as package data (`inferlet_toolchain/samples/`), so
`pie-run text_completion` works without the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_PACKAGE_SAMPLES = Path(__file__).resolve().parent / "samples"
_REPO_SAMPLES = Path(__file__).resolve().parent.parent / "sample_inferlets"
SUFFIXES = (".py", ".js")


def samples_dir() -> Path:
    for candidate in (_REPO_SAMPLES, _PACKAGE_SAMPLES):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no sample inferlets: neither {_REPO_SAMPLES} nor {_PACKAGE_SAMPLES} exists")


def sample_names() -> list[str]:
    """Every bundled sample, as `name` (Python) or `name.js` (JavaScript)."""
    try:
        folder = samples_dir()
    except FileNotFoundError:
        return []
    return sorted(p.stem if p.suffix == ".py" else p.name for p in folder.iterdir() if p.suffix in SUFFIXES)


def program_path(path: Path, what: str = "file") -> Path:
    """`path` if it exists, else the bundled sample it names; FileNotFoundError
    ("no such `what`", listing the samples) otherwise."""
    if path.exists():
        return path
    sample = find_sample(str(path))
    if sample is None:
        raise FileNotFoundError(f"no such {what}: {path} (bundled samples, usable by name: "
                                f"{', '.join(sample_names()) or 'none'})")
    return sample


def find_sample(name: str) -> Optional[Path]:
    """The bundled sample called `name` (`text_completion`, `text_completion.py`,
    `text_completion.js`), or None."""
    if "/" in name or "\\" in name:
        return None
    try:
        folder = samples_dir()
    except FileNotFoundError:
        return None
    for candidate in (name, f"{name}.py"):
        path = folder / candidate
        if path.suffix in SUFFIXES and path.is_file():
            return path
    return None
