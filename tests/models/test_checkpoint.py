"""The converted-model cache (orbax checkpoint + HF side files)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from engine_jax import checkpoint
from engine_jax.checkpoint import ModelCacheError, convert, restore_converted, save_converted
from engine_jax.gguf import GGUFError, load_gguf


@pytest.mark.slow
def test_real_model_round_trip_is_exact(smollm, tmp_path, record_property, capsys):
    started = time.perf_counter()
    save_converted(tmp_path / "smollm", smollm.config, smollm.state_dict, smollm.tokenizer, progress=True)
    saved = time.perf_counter() - started
    assert "converting smollm" in capsys.readouterr().err  # the tqdm bar goes to stderr
    started = time.perf_counter()
    restored = restore_converted(tmp_path / "smollm")
    loaded = time.perf_counter() - started
    record_property("save_seconds", round(saved, 2))
    record_property("restore_seconds", round(loaded, 2))
    print(f"\nconverted-model save {saved:.2f}s, restore {loaded:.2f}s")
    assert restored.config == json.loads(json.dumps(smollm.config))
    assert sorted(restored.state_dict) == sorted(smollm.state_dict)
    for name, expected in smollm.state_dict.items():
        got = restored.state_dict[name]
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert restored.tokenizer.encode("Hi <|im_end|> there") == smollm.tokenizer.encode("Hi <|im_end|> there")
    assert restored.tokenizer.chat_template == smollm.tokenizer.chat_template
    assert restored.info["num_parameters"] == sum(a.size for a in smollm.state_dict.values())


def test_convert_gguf_equals_direct_load(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = convert(path, tmp_path / "conv", progress=False)
    assert checkpoint.is_converted(out)
    restored = restore_converted(out)
    direct = load_gguf(path)
    assert restored.config == direct.config
    for name, expected in direct.state_dict.items():
        np.testing.assert_array_equal(restored.state_dict[name], expected)
    assert restored.info["source"]["format"] == "gguf"
    assert restored.tokenizer.eos_token_ids == direct.tokenizer.eos_token_ids


def test_convert_hf_directory(tiny_hf_dir, tiny_gguf, tmp_path):
    _, sd = tiny_gguf
    out = convert(tiny_hf_dir, tmp_path / "conv", progress=False)
    restored = restore_converted(out)
    assert restored.info["source"]["format"] == "hf"
    assert restored.config["model_type"] == "llama"
    for name, expected in sd.items():
        np.testing.assert_array_equal(restored.state_dict[name], expected, err_msg=name)


def test_reconvert_replaces_and_leaves_no_staging(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "conv"
    convert(path, out, progress=False)
    (out / "stale").write_text("x")
    convert(path, out, progress=False)
    assert not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "tiny.gguf"]


def test_failed_conversion_leaves_nothing(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    tiny.write(bad, tiny.state_dict(), extra_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(GGUFError, match="mystery"):
        convert(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_incomplete_or_foreign_directories(tiny_gguf, tmp_path):
    with pytest.raises(ModelCacheError, match="not a converted model directory"):
        restore_converted(tmp_path)
    path, _ = tiny_gguf
    out = convert(path, tmp_path / "conv", progress=False)
    marker = out / checkpoint.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 999}))
    with pytest.raises(ModelCacheError, match="format 999"):
        restore_converted(out)


def test_damaged_state_is_reported(tiny_gguf, tmp_path):
    import shutil

    path, _ = tiny_gguf
    out = convert(path, tmp_path / "conv", progress=False)
    shutil.rmtree(out / checkpoint.STATE_DIR)
    with pytest.raises(ModelCacheError, match="orbax checkpoint"):
        restore_converted(out)


def test_convert_rejects_bad_sources(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelCacheError, match="neither a GGUF file nor"):
        convert(junk, tmp_path / "out", progress=False)
    with pytest.raises(ModelCacheError, match="no such file"):
        convert(tmp_path / "absent", tmp_path / "out", progress=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        convert(tmp_path / "d", tmp_path / "out", progress=False)


def test_conversion_streams_in_batches_and_reports_peak_memory(small_model_dir, tmp_path, capsys):
    """256 MiB of float32 tensors, produced one at a time, stored as bfloat16 in 32 MiB batches:
    the process's extra anonymous memory stays far below the model's size, and is printed."""
    from engine_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_directory(small_model_dir("llama"))
    count, size = 16, 4 * 2**20  # 16 tensors of 16 MiB in float32

    def tensors():
        for i in range(count):
            yield f"t{i}", np.full(size, i, np.float32)

    out = save_converted(tmp_path / "big", {"model_type": "llama"}, tensors(), tokenizer, total=count,
                         dtype="bfloat16", batch_bytes=32 * 2**20)
    err = capsys.readouterr().err
    assert "peak host memory" in err and "bfloat16" in err
    info = checkpoint.read_info(out)
    assert info["format"] == checkpoint.FORMAT_VERSION and info["dtypes"] == ["bfloat16"]
    assert info["peak_host_bytes"] < count * size * 4 // 2, info["peak_host_bytes"]  # < half the float32 model
    state = restore_converted(out).state_dict
    assert sorted(state) == sorted(f"t{i}" for i in range(count))
    assert str(state["t7"].dtype) == "bfloat16" and float(state["t7"][123]) == 7.0


def test_open_converted_reads_a_layer_at_a_time(small_model_dir, tmp_path):
    """The loader's lazy view of a converted model: values equal a whole restore, in any read order;
    reading 128 MiB of tensors one by one holds far less than all of them; damage shows on read."""
    from engine_jax.tokenizer import Tokenizer

    out = convert(small_model_dir("llama"), tmp_path / "conv", progress=False)
    whole, lazy = restore_converted(out).state_dict, checkpoint.open_converted(out).state_dict
    assert sorted(whole) == sorted(lazy)
    order = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", *sorted(lazy)]
    for name in order:
        assert lazy[name].shape == whole[name].shape
        np.testing.assert_array_equal(np.asarray(lazy[name]), whole[name])

    count, size = 16, 2 * 2**20  # 16 tensors of 8 MiB
    big = save_converted(tmp_path / "big", {"model_type": "llama"},
                         ((f"t{i}", np.full(size, i, np.float32)) for i in range(count)),
                         Tokenizer.from_directory(small_model_dir("llama")), progress=False)
    tensors = checkpoint.open_converted(big).state_dict
    with checkpoint.PeakMemory() as peak:
        assert [float(np.asarray(tensors[f"t{i}"])[7]) for i in range(count)] == list(range(count))
    assert peak.bytes < count * size * 4 // 2, peak.bytes
    opened = checkpoint.open_converted(big).state_dict  # reads only the metadata
    for data in [p for p in (big / checkpoint.STATE_DIR).rglob("d") if p.is_dir()]:  # orbax's data files
        shutil.rmtree(data)
    with pytest.raises(ModelCacheError, match="cannot restore 't3'"):
        np.asarray(opened["t3"])


def test_format_1_caches_are_still_read(tiny_gguf, tmp_path):
    """Caches written before the streaming conversion (the tree directly in state/) restore."""
    import orbax.checkpoint as ocp

    path, _ = tiny_gguf
    out = convert(path, tmp_path / "conv", progress=False)
    tree = out / checkpoint.STATE_DIR / checkpoint.PYTREE_DIR
    state = restore_converted(out).state_dict
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns(checkpoint.STATE_DIR))
    with ocp.StandardCheckpointer() as saver:
        saver.save(old / checkpoint.STATE_DIR, state)
    info = json.loads((old / checkpoint.MARKER).read_text())
    (old / checkpoint.MARKER).write_text(json.dumps({**info, "format": 1}))
    assert tree.is_dir()
    restored = restore_converted(old).state_dict
    for name, expected in state.items():
        np.testing.assert_array_equal(restored[name], expected)
