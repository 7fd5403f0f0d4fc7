"""Tensor and data parallelism on 8 forced CPU devices: the same logits, tokens and text as one device.

Everything that needs the 8 devices runs in one child process
(``scaleout_child.py``; JAX fixes its device count at start-up) and reports
what it measured; the tests below judge the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.components import REPO, built_component
from tests.helpers.hf_models import ALL_FAMILIES as FAMILIES  # the Llama family's four and Gemma 3
from tests.runtime.guests.fixtures import TEST_PIE_HOME

CHILD = Path(__file__).with_name("scaleout_child.py")
TOLERANCE = 1e-4  # max |log-prob difference|, float32, as the Hugging Face parity tests


def child_env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PIE_HOME=str(TEST_PIE_HOME),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def report(small_model_dir, pulled_home, tmp_path_factory) -> dict:
    scratch = tmp_path_factory.mktemp("scale-out")
    spec = {
        "families": {family: str(small_model_dir(family)) for family in FAMILIES},
        "default_model": str(pulled_home / "models" / "smollm2-135m-instruct"),
        "wasm": str(built_component("text_completion")),
        "scratch": str(scratch),
    }
    (scratch / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, str(CHILD), str(scratch / "spec.json"), str(scratch / "report.json")],
                            env=child_env(), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((scratch / "report.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_tokens_equal_one_device(report, family):
    """TP=2, TP=4 and DP=2 x TP=2 (a sequence on each replica): log-probs of a prefill and a decode
    step within 1e-4 of one device, and the same greedy, seeded top-p, masked (as a grammar masks)
    and top-k draws; for qwen3 also
    TP=2 with the Pallas kernel (interpret mode) running per shard in shard_map. Gemma 3's local
    layers attend through their window (9 prompt tokens, window 6) with the slot positions whole
    on every device."""
    diffs = report["logits"][family]
    layouts = {"tp2", "tp4", "dp2xtp2"} | ({"tp2-kernel"} if family == "qwen3" else set())
    assert set(diffs) == layouts
    assert all(d < TOLERANCE for d in diffs.values()), diffs
    tokens = report["tokens"][family]
    for config in layouts:
        assert tokens[config] == [tokens["tp1"][0]] * len(tokens[config]), (config, tokens)
    assert tokens["tp1"][0][3] % 2 == 1  # the mask held


@pytest.mark.parametrize("family", FAMILIES)
def test_pages_saved_to_the_host_and_loaded_back_continue_alike(report, family):
    """Preemption's save_pages / load_pages on TP=4 (K/V split over devices come back whole) and on
    DP=2 x TP=2 (one call over both replicas' pages, rows in order): a decode step on the fresh
    pages equals one on the originals (Gemma 3: slot positions too)."""
    assert set(report["saved"][family]) == {"tp4", "dp2xtp2"}
    assert all(d <= 1e-6 for d in report["saved"][family].values()), report["saved"][family]


@pytest.mark.parametrize("family", FAMILIES)
def test_pie_run_greedy_text_is_the_same_on_every_layout(report, family):
    texts = report["texts"][family]
    for layout, run in texts.items():
        assert run["code"] == 0, (layout, run["stderr"])
    assert texts["1"]["text"].strip()
    assert {run["text"] for run in texts.values()} == {texts["1"]["text"]}
    assert "tensor parallel over 4 cpu devices" in texts["4"]["stderr"]
    if family == "mistral":
        assert "tensor parallel over 2 cpu devices, 2 replicas" in texts["dp2xtp2"]["stderr"]


def test_default_model_tp3_equals_one_device_and_tp2_is_refused(report):
    """SmolLM2-135M has 9 query and 3 KV heads: TP=3 gives the same greedy text, TP=2 a clear error."""
    runs = report["default"]
    assert runs["1"]["code"] == 0 and runs["3"]["code"] == 0, (runs["1"]["stderr"], runs["3"]["stderr"])
    assert runs["3"]["text"] == runs["1"]["text"] and runs["1"]["text"].strip()
    assert runs["2"]["code"] == 2 and runs["2"]["text"] == ""
    assert "--tensor-parallel 2: 2 does not divide the model's 9 query heads; this model can use 1, 3" \
        in runs["2"]["stderr"]
    assert "read " not in runs["2"]["stderr"]  # refused before any weight was read


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_step_has_megatron_collectives_and_gathers_no_weight(report, family):
    """TP=4 decode step: one all-reduce for the embedding lookup and two per layer ([tokens, hidden]),
    one all-gather of the logits ([rows, vocab]); nothing else, and no weight matrix is gathered."""
    layers = report["collectives"][family]["layers"]
    ops = report["collectives"][family]["ops"]
    weights = {tuple(w) for w in report["collectives"][family]["weights"]}
    reduces = [shape for op, shape in ops if op == "all-reduce"]
    gathers = [shape for op, shape in ops if op == "all-gather"]
    assert {op for op, _ in ops} == {"all-reduce", "all-gather"}, ops
    assert len(reduces) == 1 + 2 * layers and all(len(s) == 2 and s[0] == 1 for s in reduces), reduces
    assert gathers == [[1, 384]], gathers  # one output row x the vocabulary
    assert not {tuple(s) for _, s in ops} & weights


def test_converted_checkpoint_restores_a_quarter_per_device(report):
    """orbax restores each device's shard straight onto it; the engine's layout keeps the split."""
    restored = report["checkpoint"]["restored"]
    q = restored["model.layers.0.self_attn.q_proj.weight"]
    assert q["devices"] == [0, 1, 2, 3] and q["shard_shapes"] == [[q["shape"][0] // 4, q["shape"][1]]] * 4
    down = restored["model.layers.0.mlp.down_proj.weight"]
    assert down["shard_shapes"] == [[down["shape"][0], down["shape"][1] // 4]] * 4
    embed = restored["model.embed_tokens.weight"]
    assert embed["shard_shapes"] == [[embed["shape"][0] // 4, embed["shape"][1]]] * 4
    norm = restored["model.layers.0.input_layernorm.weight"]
    assert norm["shard_shapes"] == [norm["shape"]] * 4  # replicated
    engine = report["checkpoint"]["engine"]
    for name, axis in (("w_qkv", 1), ("w_o", 0), ("w_gate_up", 2), ("w_down", 0), ("embed", 0), ("lm_head", 1)):
        shape, shards = engine[name]["shape"], engine[name]["shard_shapes"]
        quarter = list(shape)
        quarter[axis] //= 4
        assert shards == [quarter] * 4, (name, shape, shards)


def test_data_parallel_places_instances_and_refuses_cross_replica_pages(report):
    out = report["replicas"]
    assert out["replica_of"] == {"a": [0], "b": [1]}  # each instance on one replica, the freest first
    assert out["same_tokens_on_both"]
    assert "live on data-parallel replicas [0, 1]" in out["mixed_forward_error"]
    assert "live on data-parallel replicas [0, 1]" in out["cross_copy_error"]
    assert out["importer_replica"] == [0]  # an instance whose first pages are imported joins the export
    assert out["importer_continues_like_exporter"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_int8_weights_shard_with_their_scales(report, family):
    """--weights int8 at TP=4 gives one device's log-probs (within 1e-4) and greedy token; a
    column-split projection (w_qkv, by KV head) splits its scales with its values, a row-split one
    (w_down) keeps whole scales on every device."""
    int8 = report["int8"][family]
    assert int8["logits"] < TOLERANCE, int8
    assert int8["tokens"][0] == int8["tokens"][1]
    shards, whole = int8["shards"], int8["shapes"]
    for name in ("w_qkv", "w_down"):
        assert len(shards[f"{name}.values"]) == 4
        for values, scale in zip(shards[f"{name}.values"], shards[f"{name}.scale"]):
            assert scale == [1] + values[1:]  # one scale per output channel of the device's own slice
    hidden = whole["w_qkv.values"][0]
    # split by KV head: the layout repeats the 2 KV heads to 4, one per device
    assert all(v[0] == hidden and v[1] == 1 for v in shards["w_qkv.values"]), shards
    inter, hidden_out = whole["w_down.values"]
    assert all(v == [inter // 4, hidden_out] for v in shards["w_down.values"]), shards  # row split
