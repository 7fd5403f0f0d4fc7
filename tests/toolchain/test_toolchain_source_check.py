"""pie-build's static checks: clear file:line errors, exit code 2, nothing run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from inferlet_toolchain import cli
from inferlet_toolchain.source_check import SourceError, check_source

GOOD = """\
import json
import inferlet
from inferlet import Arg

inferlet.declare(
    name="good",
    version="0.2.0",
    description="Good.",
    arguments=[Arg("n", int, default=2, help="How many."), inferlet.Arg("flag", bool)],
    capabilities=["kvstore"],
)


def main(args):
    import heapq
    return json.dumps(heapq.nsmallest(args.n, [3, 1, 2]))
"""


def write(tmp_path: Path, text: str, name: str = "app.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_source(tmp_path: Path) -> None:
    info = check_source(write(tmp_path, GOOD))
    m = info.manifest
    assert (m.name, m.version, m.description, m.capabilities) == ("good", "0.2.0", "Good.", ["kvstore"])
    assert [(a.name, a.type, a.default) for a in m.arguments][0] == ("n", "int", 2)
    assert m.arguments[1].type == "bool"
    # Function-level imports are found too: they get pre-imported at build time.
    assert {"json", "heapq"} <= info.stdlib_modules


def test_sibling_modules_are_bundled_and_checked(tmp_path: Path) -> None:
    write(tmp_path, "import numpy\n", "helper.py")
    app = write(tmp_path, "import helper\ndef main(args):\n    return ''\n")
    with pytest.raises(SourceError) as info:
        check_source(app)
    assert str(info.value).startswith(f"{tmp_path / 'helper.py'}:1: cannot import 'numpy'")
    write(tmp_path, "import math\n", "helper.py")
    assert check_source(app).local_files == [tmp_path / "helper.py"]


@pytest.mark.parametrize("source, line, message", [
    ("def main(args):\n    return (\n", 2, "syntax error"),
    ("import inferlet\nimport numpy as np\ndef main(args):\n    return ''\n", 2, "cannot import 'numpy'"),
    ("def main(args):\n    from torch import nn\n", 2, "cannot import 'torch'"),
    ("import subprocess\ndef main(args):\n    return ''\n", 1, "there are no processes in Wasm"),
    ("import ctypes\ndef main(a):\n    return ''\n", 1, "cannot import 'ctypes'"),
    ("from . import x\ndef main(args):\n    return ''\n", 1, "relative imports"),
    ("import inferlet\n\n\ndef helper():\n    pass\n", None, "no main function"),
    ("def main(a, b):\n    return ''\n", 1, "at most one argument"),
    ("import inferlet\ninferlet.declare(name='Bad Name')\ndef main(a):\n    return ''\n", 2, "name 'Bad Name'"),
    ("import inferlet\ninferlet.declare(\n    name='x',\n    arguments=[inferlet.Arg('n', int, default='two')],\n)\ndef main(a):\n    return ''\n",
     4, "default 'two' is not a int"),
    ("import inferlet\nN = 3\ninferlet.declare(name='x', version=N)\ndef main(a):\n    return ''\n", 3, "must be a literal"),
    ("import inferlet\ninferlet.declare(name='x', colour='red')\ndef main(a):\n    return ''\n", 2, "no field 'colour'"),
    ("import inferlet\ninferlet.declare(name='x', capabilities=['root'])\ndef main(a):\n    return ''\n", 2, "unknown capability"),
    ("import inferlet\ndef main(a):\n    inferlet.declare(name='x')\n    return ''\n", 3, "module-level statement"),
    ("import inferlet\ninferlet.declare(name='x', arguments=[inferlet.Arg('n', list)])\ndef main(a):\n    return ''\n", 2, "type must be one of"),
])
def test_errors_have_file_and_line(tmp_path: Path, source: str, line, message: str, capsys) -> None:
    path = write(tmp_path, source)
    with pytest.raises(SourceError) as info:
        check_source(path)
    error = info.value
    assert message in error.reason
    assert error.line == line
    prefix = f"{path}:{line}:" if line is not None else f"{path}:"
    assert str(error).startswith(prefix)
    # The CLI prints it without a traceback and exits 2; nothing is built.
    assert cli.main([str(path), "-o", str(tmp_path / "out.wasm")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pie-build: error: {prefix}") and "Traceback" not in err
    assert not (tmp_path / "out.wasm").exists()


def test_syntax_error_reports_column(tmp_path: Path) -> None:
    path = write(tmp_path, "def main(args):\n    return 1 +* 2\n")
    with pytest.raises(SourceError) as info:
        check_source(path)
    assert info.value.line == 2 and info.value.col is not None
    assert str(info.value).startswith(f"{path}:2:{info.value.col}: syntax error")


def test_cli_help_and_missing_file(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "pie-build" in out and "--no-cache" in out and "inferlet.declare" in out
    assert cli.main([str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_nothing_of_the_inferlet_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef main(a):\n    return ''\n")
    check_source(path)
    assert not marker.exists()
