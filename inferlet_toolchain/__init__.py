"""The inferlet toolchain: pie-build, the manifest, and the guest SDKs.

- `build(source, output)`: a Python or JavaScript inferlet -> a WebAssembly
  component; a component built elsewhere + a manifest file -> the same.
- `Manifest`, `read_manifest(path)`, `load_manifest_file(path)`: what an
  inferlet declares, read from a component or a TOML/JSON file.
- `inferlet/`: the SDK bundled into every Python inferlet (importable as
  `inferlet` inside the guest); `js/sdk/`: the JavaScript one.
- `wit_functions()`: every function of the contract, for drift checks.
"""

from .build import BuildError, build
from .manifest import HelpRequested, Manifest, ManifestError, load_manifest_file, read_manifest
from .source_check import SourceError, check_source
from .wit_spec import find_wit_dir, linker_names, wit_functions

__all__ = [
    "BuildError", "HelpRequested", "Manifest", "ManifestError", "SourceError", "build",
    "check_source", "find_wit_dir", "linker_names", "load_manifest_file", "read_manifest", "wit_functions",
]
