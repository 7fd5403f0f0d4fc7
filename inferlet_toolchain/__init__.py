"""The inferlet toolchain: pie-build, the manifest, and the guest SDK.

- `build(source, output)`: a Python inferlet -> a WebAssembly component.
- `Manifest`, `read_manifest(path)`: what a built inferlet declares.
- `inferlet/`: the SDK bundled into every Python inferlet (importable as
  `inferlet` inside the guest).
- `wit_functions()`: every function of the contract, for drift checks.
"""

from .build import BuildError, build
from .manifest import HelpRequested, Manifest, ManifestError, read_manifest
from .source_check import SourceError, check_source
from .wit_spec import find_wit_dir, linker_names, wit_functions

__all__ = [
    "BuildError", "HelpRequested", "Manifest", "ManifestError", "SourceError", "build",
    "check_source", "find_wit_dir", "linker_names", "read_manifest", "wit_functions",
]
