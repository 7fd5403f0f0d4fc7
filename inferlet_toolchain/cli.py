"""pie-build: compile an inferlet (Python, JavaScript, or a component built elsewhere) for pie-run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .build import BuildError, build, default_cache_dir
from .manifest import ManifestError
from .source_check import SourceError

_EPILOG = """\
Python (.py): the inferlet declares itself in its source with a module-level call

  inferlet.declare(name="my-inferlet", version="0.1.0", description="...",
                   arguments=[inferlet.Arg("prompt", str, default="Hi", help="...")],
                   capabilities=[])

and defines `def main(args) -> str` (or `async def main(args)`); pie-build
compiles it with componentize-py.

JavaScript (.js, .mjs): the module calls `declare({name: ..., arguments:
[{name: "prompt", type: "string", default: "Hi", help: "..."}]})` imported
from 'inferlet' and exports `async function main(args)`; pie-build bundles
it with the SDK and compiles it with componentize-js (installed with npm into
$PIE_HOME/js on first use; needs node and npm).

Any other language (.wasm): a component of the `inferlet` world built
elsewhere, with --manifest FILE (TOML or JSON: name, version, description,
capabilities, [[arguments]] with name/type/default/help/required; see
docs/writing-inferlets.md). pie-build embeds it.

Either way pie-build checks the declaration without running the inferlet,
builds against the Pie contract (wit/inferlet.wit), embeds the manifest that
pie-run uses for `-- --help`, argument checks and capabilities, and writes
NAME.wasm. Builds are cached by content hash in $PIE_HOME/build (default
~/.cache/pie/build).

exit status: 0 built, 2 a problem with the source or the build, 1 a bug.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie-build",
        description="Compile an inferlet into a WebAssembly component for pie-run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path,
                        help="the inferlet: Python (app.py), JavaScript (app.js) or a component (app.wasm)")
    parser.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                        help="for a component built elsewhere: its manifest (.toml or .json) to embed")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="where to write the component (default: NAME.wasm in the current "
                             "directory, NAME from the inferlet's declaration)")
    parser.add_argument("--no-cache", action="store_true",
                        help="rebuild even if an identical build is cached")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"build cache directory (default: {default_cache_dir()})")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = build(args.source, args.output, manifest=args.manifest, cache_dir=args.cache_dir, quiet=args.quiet,
                    use_cache=not args.no_cache)
    except (SourceError, ManifestError, BuildError) as error:
        print(f"pie-build: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pie-build: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
