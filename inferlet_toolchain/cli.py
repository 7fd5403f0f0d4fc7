"""pie-build: compile a Python inferlet into a WebAssembly component."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .build import BuildError, build, default_cache_dir
from .manifest import ManifestError
from .source_check import SourceError

_EPILOG = """\
The inferlet declares itself in its source with a module-level call:

  inferlet.declare(name="my-inferlet", version="0.1.0", description="...",
                   arguments=[inferlet.Arg("prompt", str, default="Hi", help="...")],
                   capabilities=[])

and defines `def main(args) -> str` (or `async def main(args)`). pie-build
checks the source without running it, compiles it with componentize-py
against the Pie contract (wit/inferlet.wit), embeds the declaration as the
component's manifest and writes NAME.wasm. Builds are cached by content
hash in $PIE_HOME/build (default ~/.cache/pie/build).

exit status: 0 built, 2 a problem with the source or the build, 1 a bug.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pie-build",
        description="Compile a Python inferlet into a WebAssembly component for pie-run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="the inferlet's Python source (e.g. inferlet.py)")
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
        out = build(args.source, args.output, cache_dir=args.cache_dir, quiet=args.quiet,
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
