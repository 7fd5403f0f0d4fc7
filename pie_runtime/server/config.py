"""`pie-serve` settings: flags, an optional TOML file, and the tokens file.

Precedence: built-in defaults < the `--config` file < flags given on the
command line. The TOML file may put its keys at the top level or in any of
the sections `[server]`, `[engine]`, `[runtime]`, `[limits]`, `[openai]`
(the sections only group; every key is the long flag's name, with dashes or
underscores: `kv-pages = 512` is `--kv-pages 512`). A list flag (`program`,
`expose`) takes a TOML array. An unknown key or a bad value is an error that
names the file and the key.

The tokens file (`--auth FILE`) maps bearer tokens to tenants:

    [tokens]
    "sk-alice-0c1f..." = "alice"
    "sk-bob-77e2..." = "bob"

A tenant is a namespace: its instances, key-value store, exports and
broadcast topics are its own. Several tokens may name one tenant.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from pie_runtime.options import add_engine_options, add_runtime_options, engine_options, positive_float, positive_int

SECTIONS = ("server", "engine", "runtime", "limits", "openai")
DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

EPILOG = """\
config file:
  pie-serve --config pie.toml reads the same settings from TOML (keys are the
  flag names; see docs/serving.md). Flags override the file.

authentication:
  --auth FILE maps bearer tokens to tenants ([tokens] "TOKEN" = "TENANT").
  Without it every client is tenant 'default' and the server only listens on
  a loopback address.

endpoints (one port):
  /v1/ws                 the client protocol (WebSocket, MessagePack; docs/protocol.md)
  /v1/models, /v1/completions, /v1/chat/completions   OpenAI-compatible HTTP (+ SSE)
  /health, /metrics      readiness (503 while starting or draining), Prometheus metrics

examples:
  pie-serve                                   # default model on 127.0.0.1:8080
  pie-serve --config pie.toml --port 9000
  pie-serve --auth tokens.toml --host 0.0.0.0 --expose haiku=haiku.wasm
  pie-serve --tensor-parallel 4               # the model sharded over 4 devices

devices: --tensor-parallel, --data-parallel and the multi-host flags as pie-run's.
  With --num-processes P, run the same command on every host: process 0 serves,
  the others run its engine steps and exit with it; if one of them dies, the
  server fails its in-flight work and exits with status 3.
"""


class ConfigError(ValueError):
    """A settings problem, worded for the operator."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pie-serve",
        description="Serve a model to remote clients: inferlets over WebSocket, an OpenAI-compatible "
                    "HTTP API, health and metrics, all on one port.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with any of these settings (flags override it)")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 = any free port)")
    auth = g.add_mutually_exclusive_group()
    auth.add_argument("--auth", metavar="TOKENS_FILE",
                      help="require bearer tokens; the file maps each token to a tenant")
    auth.add_argument("--no-auth", action="store_true",
                      help="no tokens: every client is tenant 'default' (loopback addresses only; the default)")
    g.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, let running instances finish this long, then terminate them "
                        "(default 30)")
    add_engine_options(p)
    add_runtime_options(p)
    w = p.add_argument_group("start-up")
    w.add_argument("--warmup-batches", default="1,2,4,8,16", metavar="LIST",
                   help="decode batch sizes to compile before serving (default 1,2,4,8,16; '' = none)")
    w.add_argument("--warmup-prompts", default="128", metavar="LIST",
                   help="prompt lengths (tokens) to compile prefill steps for (default 128; '' = none)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-tenant-instances", type=positive_int, default=64, metavar="N",
                     help="instances running at once per tenant (default 64)")
    lim.add_argument("--max-upload-mb", type=positive_int, default=64, metavar="MB",
                     help="largest program a client may upload (default 64)")
    lim.add_argument("--max-programs", type=positive_int, default=256, metavar="N",
                     help="uploaded programs kept compiled; past it the least recently used is forgotten "
                          "and its tenants upload it again (default 256)")
    lim.add_argument("--event-buffer-kb", type=positive_int, default=1024, metavar="KB",
                     help="events buffered per instance for a client that reads slowly or is detached; "
                          "past it the instance's next output waits (default 1024)")
    lim.add_argument("--keep-ended-seconds", type=positive_float, default=600.0, metavar="S",
                     help="how long a detached instance's outcome waits for its client to re-attach "
                          "(default 600)")
    oa = p.add_argument_group("OpenAI-compatible API")
    oa.add_argument("--expose", action="append", default=[], metavar="NAME=PROGRAM",
                    help="serve PROGRAM (.wasm, .py or a --program NAME) as OpenAI model NAME: the request "
                         "JSON is its first message, what it sends is streamed back (repeatable)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info)")
    return p


def parse_settings(argv: Sequence[str]) -> argparse.Namespace:
    """Defaults, then the --config file, then the flags given. Raises ConfigError."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    defaults = {dest: a.default for dest, a in actions.items()}
    for a in actions.values():
        a.default = argparse.SUPPRESS
    given = vars(parser.parse_args(list(argv)))
    by_flag = {opt[2:]: a for a in actions.values() for opt in a.option_strings if opt.startswith("--")}
    from_file = read_config(Path(given["config"]), by_flag) if "config" in given else {}
    if "auth" in given or "no_auth" in given:  # a flag overrides the file's choice, either way
        from_file.pop("auth", None)
        from_file.pop("no_auth", None)
    settings = argparse.Namespace(**{**defaults, **from_file, **given})
    check_settings(settings)
    return settings


def read_config(path: Path, by_flag: dict[str, argparse.Action]) -> dict[str, Any]:
    """{dest: value} from a TOML file whose keys are long flag names (`by_flag`)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    flat: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                flat[inner] = (f"[{key}] {inner}", inner_value)
        else:
            flat[key] = (key, value)
    values: dict[str, Any] = {}
    for key, (where, value) in flat.items():
        action = by_flag.get(key.replace("_", "-"))
        if action is None or action.dest == "config":
            known = ", ".join(sorted(flag for flag in by_flag if flag != "config"))
            raise ConfigError(f"--config {path}: unknown setting {where!r}; known: {known}")
        values[action.dest] = _convert(action, value, f"--config {path}: {where}")
    return values


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be an array of strings, got {value!r}")
        return [_convert_one(action, v, where) for v in value]
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where} must be a single value, got {value!r}")
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must not be true/false, got {value!r}")
    converted: Any = value
    if action.type is not None:
        try:
            converted = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    elif not isinstance(value, str):
        converted = str(value)
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def check_settings(s: argparse.Namespace) -> None:
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"--port {s.port} is not a port number")
    if s.drain_seconds < 0:
        raise ConfigError(f"--drain-seconds must be >= 0, got {s.drain_seconds}")
    if s.auth is None and not is_loopback(s.host):
        raise ConfigError(f"refusing to listen on {s.host} without --auth: an open server would let anyone "
                          "run programs on it; give --auth TOKENS_FILE, or listen on 127.0.0.1")
    s.warmup_batches = int_list(s.warmup_batches, "--warmup-batches")
    s.warmup_prompts = int_list(s.warmup_prompts, "--warmup-prompts")
    s.expose = dict(_name_value(spec, "--expose") for spec in s.expose)
    s.tokens = read_tokens(Path(s.auth)) if s.auth is not None else None
    try:
        engine_options(s)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def int_list(value: Any, flag: str) -> tuple[int, ...]:
    if isinstance(value, tuple):
        return value
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    try:
        numbers = tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected a comma list of positive integers") from None
    if any(n <= 0 for n in numbers):
        raise ConfigError(f"{flag} {value!r}: expected a comma list of positive integers")
    return numbers


def _name_value(spec: str, flag: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ConfigError(f"{flag} {spec!r}: expected NAME=PROGRAM")
    return name.strip(), value.strip()


def read_tokens(path: Path) -> dict[str, str]:
    """token -> tenant from a tokens file (see the module doc)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--auth {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--auth {path}: not valid TOML: {e}") from None
    table = data.get("tokens")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"--auth {path}: expected a [tokens] table of \"TOKEN\" = \"TENANT\" entries")
    tokens: dict[str, str] = {}
    for token, tenant in table.items():
        if not isinstance(tenant, str) or not TENANT_NAME.match(tenant):
            raise ConfigError(f"--auth {path}: tenant {tenant!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if len(token) < 16:
            raise ConfigError(f"--auth {path}: the token for tenant {tenant!r} is shorter than 16 characters")
        tokens[token] = tenant
    return tokens
