"""Manifest: validation, JSON, the pie-manifest section, parse_cli, help."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferlet_toolchain.inferlet.args import MISSING, ArgSpec, ArgumentError
from inferlet_toolchain.manifest import (
    HelpRequested, Manifest, ManifestError, embed, read_manifest, read_manifest_bytes,
)

COMPONENT_PREAMBLE = b"\x00asm\x0d\x00\x01\x00"


def sample_manifest() -> Manifest:
    return Manifest(
        name="demo", version="1.2.3", description="A demo.",
        arguments=[
            ArgSpec("prompt", "str", "hi", "Prompt."),
            ArgSpec("max-tokens", "int", 8, "Most tokens."),
            ArgSpec("temperature", "float", 0.5),
            ArgSpec("chat", "bool"),
            ArgSpec("seed", "int"),
            ArgSpec("model", "str", required=True, help="Model name."),
        ],
        capabilities=["kvstore"],
    )


def test_parse_cli_fills_defaults_and_converts_types() -> None:
    m = sample_manifest()
    out = m.parse_cli(["--model", "x", "--max-tokens", "3", "--temperature=2", "--chat"])
    assert out == ["--prompt=hi", "--max-tokens=3", "--temperature=2.0", "--chat=true", "--model=x"]
    assert m.parse_args(["--model=x", "--no-chat"])["chat"] is False
    assert m.parse_args(["--model=x"])["seed"] is None


@pytest.mark.parametrize("argv, message", [
    (["--model", "x", "--max-tokens", "many"], "--max-tokens: expected a int, got 'many'"),
    (["--model", "x", "--bogus", "1"], "unknown argument --bogus"),
    (["--model", "x", "--max_tokens", "1"], "did you mean --max-tokens"),
    ([], "missing required argument --model"),
    (["--model"], "--model needs a value"),
    (["--model", "x", "stray"], "unexpected argument 'stray'"),
    (["--model", "x", "--chat=maybe"], "expected true or false"),
    (["--model", "x", "--temperature", "nan"], "expected a float"),
])
def test_parse_cli_errors_are_clear(argv: list[str], message: str) -> None:
    with pytest.raises(ArgumentError) as info:
        sample_manifest().parse_cli(argv)
    assert message in str(info.value)
    assert str(info.value).startswith("demo: ")


def test_help() -> None:
    m = sample_manifest()
    with pytest.raises(HelpRequested) as info:
        m.parse_cli(["--model", "x", "--help"])
    text = info.value.text
    assert text == m.format_help()
    assert "usage: demo [options]" in text and "A demo." in text
    assert "--max-tokens INT" in text and "default: 8" in text
    assert "--model STR" in text and "required" in text
    assert "capabilities: kvstore" in text


def test_json_round_trip_and_section_round_trip() -> None:
    m = sample_manifest()
    assert Manifest.from_json(m.to_json()) == m
    component = COMPONENT_PREAMBLE + b"\x01\x03abc"  # one opaque (non-custom) section
    embedded = embed(component, m)
    assert embedded.startswith(component)
    assert read_manifest_bytes(embedded) == m
    # Re-embedding replaces the section instead of adding a second one.
    other = Manifest(name="other")
    twice = embed(embedded, other)
    assert read_manifest_bytes(twice) == other
    assert twice.count(b"pie-manifest") == 1


def test_read_manifest_errors(tmp_path) -> None:
    core = tmp_path / "core.wasm"
    core.write_bytes(b"\x00asm\x01\x00\x00\x00")
    with pytest.raises(ManifestError, match="core Wasm module, not a component"):
        read_manifest(core)
    bare = tmp_path / "bare.wasm"
    bare.write_bytes(COMPONENT_PREAMBLE)
    with pytest.raises(ManifestError, match=r"bare\.wasm: .*no 'pie-manifest' section"):
        read_manifest(bare)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "missing.wasm")


@pytest.mark.parametrize("manifest, message", [
    (Manifest(name="Bad Name"), "name 'Bad Name'"),
    (Manifest(name="ok", version="one"), "semantic version"),
    (Manifest(name="ok", capabilities=["root"]), "unknown capability 'root'"),
    (Manifest(name="ok", arguments=[ArgSpec("a"), ArgSpec("a")]), "declared twice"),
    (Manifest(name="ok", arguments=[ArgSpec("help")]), "reserved"),
    (Manifest(name="ok", arguments=[ArgSpec("n", "int", "x")]), "default 'x' is not a int"),
    (Manifest(name="ok", arguments=[ArgSpec("n", "list")]), "type must be one of"),
])
def test_validation(manifest: Manifest, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest.validate("x.py", 3)
    with pytest.raises(ManifestError, match=r"^x\.py:3: "):
        manifest.validate("x.py", 3)


_names = st.from_regex(r"[a-z][a-z0-9]{0,6}(-[a-z0-9]{1,4})?", fullmatch=True).filter(lambda n: n not in ("h", "help"))
_values = {
    "str": st.text(max_size=20),
    "int": st.integers(-10**12, 10**12),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
}


@st.composite
def specs_and_values(draw):
    names = draw(st.lists(_names, min_size=0, max_size=6, unique_by=lambda n: n.replace("-", "_")))
    specs, values = [], {}
    for name in names:
        type_name = draw(st.sampled_from(sorted(_values)))
        default = draw(st.one_of(st.just(MISSING), _values[type_name]))
        specs.append(ArgSpec(name, type_name, default))
        if draw(st.booleans()):
            values[name] = draw(_values[type_name])
    return specs, values


@settings(max_examples=200, deadline=None)
@given(specs_and_values())
def test_canonical_form_round_trips(case) -> None:
    specs, given_values = case
    m = Manifest(name="prop", arguments=specs)
    m.validate()
    argv = []
    for name, value in given_values.items():
        spec = next(s for s in specs if s.name == name)
        argv.append(f"--{name}={spec.render(value)}")
    parsed = m.parse_args(argv)
    for name, value in given_values.items():
        assert parsed[name] == value
    canonical = m.parse_cli(argv)
    # The canonical list parses to the same values, and is a fixed point.
    assert m.parse_args(canonical) == parsed
    assert m.parse_cli(canonical) == canonical
    assert Manifest.from_json(m.to_json()) == m
