"""pie-serve's settings: defaults < --config TOML < flags; clear errors for bad files and unsafe choices."""

from __future__ import annotations

import pytest

from pie_runtime.server.cli import main
from pie_runtime.policies import DEFAULT_TOKEN_BUDGET
from pie_runtime.server.config import ConfigError, parse_settings


def write(path, text):
    path.write_text(text)
    return str(path)


def test_file_sections_and_flags_override(tmp_path):
    config = write(tmp_path / "pie.toml", """
port = 9001
[engine]
kv-pages = 300
page_size = 8
token-budget = 64
tensor-parallel = 2
data_parallel = 2
weights = "int8"
[runtime]
program = ["a=a.wasm", "b=b.py"]
[limits]
max-tenant-instances = 3
namespace-pages = 100
""")
    s = parse_settings(["--config", config, "--kv-pages", "100"])
    assert (s.port, s.kv_pages, s.page_size, s.max_tenant_instances) == (9001, 100, 8, 3)
    assert s.token_budget == 64 and parse_settings([]).token_budget == DEFAULT_TOKEN_BUDGET
    assert (s.tensor_parallel, s.data_parallel, s.num_processes, s.weights) == (2, 2, 1, "int8")
    assert s.programs == ["a=a.wasm", "b=b.py"]
    assert s.limit_namespace_pages == 100  # a tenant limit, read like its flag --namespace-pages
    assert s.host == "127.0.0.1" and s.tokens is None  # defaults where neither says
    assert s.warmup_batches == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("text, words", [
    ("kv_pagez = 3", ["unknown setting", "kv_pagez"]),
    ("[engine]\npage-size = -1", ["[engine] page-size", "positive"]),
    ("batching = 'fastest'", ["batching", "adaptive"]),
    ("port = [1, 2]", ["port", "single value"]),
    ("no-auth = 'yes'", ["no-auth", "true or false"]),
    ("port = ", ["not valid TOML"]),
    ("[engine]\nnum-processes = 2", ["--num-processes > 1 needs --coordinator"]),
    ("[engine]\ntensor-parallel = 0", ["[engine] tensor-parallel", "positive"]),
    ("token-budget = -1", ["token-budget", "0 or more"]),
    ("[engine]\nweights = 'int4'", ["[engine] weights", "float, int8"]),
])
def test_bad_config_files_name_the_setting(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        parse_settings(["--config", write(tmp_path / "bad.toml", text)])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_no_auth_only_on_loopback_and_tokens_files_are_checked(tmp_path, capsys):
    with pytest.raises(ConfigError, match="without --auth"):
        parse_settings(["--host", "0.0.0.0"])
    tokens = write(tmp_path / "tokens.toml", '[tokens]\n"sk-0123456789abcdef" = "team-a"\n')
    s = parse_settings(["--host", "0.0.0.0", "--auth", tokens])
    assert s.tokens == {"sk-0123456789abcdef": "team-a"}
    for bad, words in [('[tokens]\n"short" = "a"\n', "shorter than 16"),
                       ('[tokens]\n"sk-0123456789abcdef" = "a b"\n', "letters, digits"),
                       ('[users]\n', r"a \[tokens\] table")]:
        with pytest.raises(ConfigError, match=words):
            parse_settings(["--auth", write(tmp_path / "t.toml", bad)])
    assert main(["--auth", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert main(["--expose", "nameonly"]) == 2


def test_help_explains_the_endpoints(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in ("--config", "--auth", "--drain-seconds", "/v1/chat/completions", "/metrics", "--expose",
                  "--tensor-parallel", "--data-parallel", "--coordinator", "--process-id",
                  "--token-budget", "chunks"):
        assert words in out
