"""Declared inferlet arguments: their spec, parsing and canonical form.

Pure Python with no binding imports: the same code parses arguments on the
host (pie-build / pie-run, through `inferlet_toolchain.manifest`) and inside
the guest (the SDK's `run` glue), so both sides agree on every value.

Grammar of an argument list: `--name value`, `--name=value`; a bool argument
is also accepted as a bare `--name` (true) or `--no-name` (false). Names use
dashes; the Python attribute on `Args` uses underscores (`--max-tokens` ->
`args.max_tokens`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

# The argument types an inferlet can declare, by the name used in source.
TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ArgumentError(ValueError):
    """A bad argument list (unknown name, wrong type, missing value...)."""


class _Missing:
    """Marks an argument declared without a default."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class ArgSpec:
    """One declared argument.

    `default` is MISSING when there is none: the value is then None unless the
    argument is `required`, in which case it must be given.
    """

    name: str
    type: str = "str"
    default: Any = MISSING
    help: str = ""
    required: bool = False

    @property
    def attr(self) -> str:
        """The attribute name on `Args`."""
        return self.name.replace("-", "_")

    def check(self) -> None:
        """Raises ArgumentError when the spec itself is inconsistent."""
        if not _NAME_RE.match(self.name):
            raise ArgumentError(
                f"argument name {self.name!r} must be lowercase words joined by '-' "
                "(e.g. 'max-tokens')"
            )
        if self.type not in TYPES:
            raise ArgumentError(
                f"argument {self.name!r}: type must be one of {', '.join(TYPES)}, got {self.type!r}"
            )
        if self.required and self.default is not MISSING:
            raise ArgumentError(f"argument {self.name!r}: a required argument cannot have a default")
        if self.default is not MISSING and self.default is not None:
            if not _is_instance(self.default, self.type):
                raise ArgumentError(
                    f"argument {self.name!r}: default {self.default!r} is not a {self.type}"
                )

    def convert(self, text: str) -> Any:
        """Parses one value given on a command line."""
        try:
            if self.type == "str":
                return text
            if self.type == "int":
                return int(text, 10)
            if self.type == "float":
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError("not finite")
                return value
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("not a bool")
        except ValueError:
            expected = "true or false" if self.type == "bool" else f"a {self.type}"
            raise ArgumentError(f"--{self.name}: expected {expected}, got {text!r}") from None

    def render(self, value: Any) -> str:
        """The canonical text of a value (inverse of `convert`)."""
        if self.type == "bool":
            return "true" if value else "false"
        if self.type == "float":
            return repr(float(value))
        return str(value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "help": self.help}
        if self.required:
            out["required"] = True
        if self.default is not MISSING:
            out["default"] = self.default
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ArgSpec":
        unknown = set(data) - {"name", "type", "help", "required", "default"}
        if unknown:
            raise ArgumentError(f"unknown argument field(s): {', '.join(sorted(unknown))}")
        if "name" not in data:
            raise ArgumentError("argument without a 'name'")
        spec = cls(
            name=data["name"],
            type=data.get("type", "str"),
            default=data.get("default", MISSING),
            help=data.get("help", ""),
            required=bool(data.get("required", False)),
        )
        spec.check()
        return spec


def _is_instance(value: Any, type_name: str) -> bool:
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def initial_value(spec: ArgSpec) -> Any:
    """The value of an argument that was not given."""
    if spec.default is not MISSING:
        if spec.type == "float" and spec.default is not None:
            return float(spec.default)
        return spec.default
    if spec.type == "bool":
        return False
    return None


def parse(specs: list[ArgSpec], argv: list[str]) -> dict[str, Any]:
    """Parses `argv` against `specs`: {name: value} for every declared argument.

    Raises ArgumentError on an unknown name, a missing or ill-typed value, or a
    missing required argument. `--help` is not handled here (callers decide).
    """
    by_name = {spec.name: spec for spec in specs}
    given: dict[str, Any] = {}
    items: Iterator[str] = iter(argv)
    for item in items:
        if not item.startswith("--") or item == "--":
            raise ArgumentError(f"unexpected argument {item!r} (arguments look like --name value)")
        name, eq, inline = item[2:].partition("=")
        spec = by_name.get(name)
        if spec is None and name.startswith("no-") and not eq:
            negated = by_name.get(name[3:])
            if negated is not None and negated.type == "bool":
                given[negated.name] = False
                continue
        if spec is None:
            raise ArgumentError(f"unknown argument --{name}{_suggest(name, by_name)}")
        if eq:
            given[name] = spec.convert(inline)
        elif spec.type == "bool":
            given[name] = True
        else:
            text = next(items, None)
            if text is None:
                raise ArgumentError(f"--{name} needs a value")
            given[name] = spec.convert(text)
    values: dict[str, Any] = {}
    for spec in specs:
        if spec.name in given:
            values[spec.name] = given[spec.name]
        elif spec.required:
            raise ArgumentError(f"missing required argument --{spec.name}")
        else:
            values[spec.name] = initial_value(spec)
    return values


def canonical(specs: list[ArgSpec], values: dict[str, Any]) -> list[str]:
    """Every argument with a value as `--name=value`, in declaration order.

    `parse(specs, canonical(specs, v)) == v` for any v that `parse` produced.
    Arguments whose value is None (optional, no default) are left out.
    """
    out = []
    for spec in specs:
        value = values.get(spec.name)
        if value is not None:
            out.append(f"--{spec.name}={spec.render(value)}")
    return out


def _suggest(name: str, by_name: dict[str, ArgSpec]) -> str:
    close = [n for n in by_name if n.replace("-", "") == name.replace("-", "").replace("_", "")]
    if close:
        return f" (did you mean --{close[0]}?)"
    if by_name:
        return f" (known: {', '.join('--' + n for n in by_name)})"
    return " (this inferlet takes no arguments)"


@dataclass
class Args:
    """Parsed arguments, as attributes (`args.max_tokens`)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, attr: str) -> Any:
        values = self.__dict__.get("values", {})
        name = attr.replace("_", "-")
        if name in values:
            return values[name]
        raise AttributeError(f"no argument named {name!r} was declared (known: {', '.join(values)})")

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)
