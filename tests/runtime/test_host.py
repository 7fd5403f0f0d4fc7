"""The Wasm host end to end: real components (tests/runtime/guests/probe.py), real wasmtime,
the real serving core and engine on a tiny random model.

The probe guest is written against the raw generated bindings, so these
tests check the host alone, not the SDK.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pie_runtime.errors import PieError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.conversions import decode_brle, encode_brle
from pie_runtime.host.linker import bound_function_names
from pie_runtime.host.registry import Host, ServedModel
from pie_runtime.instance import InstanceLimits
from pie_runtime.kvstore import KVStore
from pie_runtime.messaging import Broker, ClientChannel
from tests.runtime.guests.fixtures import (
    NUM_PAGES,
    PAGE_SIZE,
    engine_greedy,
    launch,
    run,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def host(engine, core):
    return Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None)


@pytest.fixture()
def bare_host():
    """A host serving no model: messaging, kvstore and limits need none."""
    return Host([], guest_output=lambda *a: None)


def _ok_json(outcome):
    assert outcome.ok, outcome.describe()
    return json.loads(outcome.value)


def _assert_pool_restored(core, timeout=30.0):
    assert core.wait_idle(timeout)
    assert core.free_pages() == NUM_PAGES
    assert core.held_pages() == 0
    core.check_invariants()


# --------------------------------------------------------------------------- contract coverage


def test_every_contract_function_is_bound(probe):
    """The linker binds exactly the functions the component imports from pie:inferlet."""
    from pie_runtime.component_cache import shared_engine
    from wasmtime.component import ComponentInstanceType

    imported = set()
    for name, ext in probe.type.imports(shared_engine()).items():
        if not name.startswith("pie:inferlet/"):
            continue
        ty = ext.ty
        assert isinstance(ty, ComponentInstanceType)
        for item, item_ext in ty.exports(shared_engine()).items():
            if type(item_ext.ty).__name__ == "FuncType":
                imported.add(f"{name}#{item}")
    assert imported == set(bound_function_names())


# --------------------------------------------------------------------------- runtime / model / tokenizer


def test_runtime_calls(host, probe):
    a = launch(host, probe, "runtime", "x", "--flag=1")
    b = launch(host, probe, "runtime")
    ra, rb = _ok_json(a.wait(60)), _ok_json(b.wait(60))
    assert ra["version"] == host.version
    assert ra["arguments"] == ["runtime", "x", "--flag=1"]
    assert ra["models"] == ["tiny"]
    assert ra["instance_id"] == a.instance_id and rb["instance_id"] == b.instance_id
    assert ra["instance_id"] != rb["instance_id"]


def test_model_info_and_tokenizer_match_the_engine(host, probe, engine):
    text = "Hello <|im_start|>world, héllo!"
    r = _ok_json(run(host, probe, "info", text))
    tok, cfg = engine.tokenizer, engine.config
    assert r["info"] == {
        "name": "tiny", "architecture": cfg.architecture, "vocab_size": cfg.vocab_size,
        "page_size": PAGE_SIZE, "max_positions": cfg.max_position_embeddings,
        "eos_tokens": list(tok.eos_token_ids), "bos_token": tok.bos_token_id,
        "chat_template": tok.chat_template,
    }
    assert r["encode"] == tok.encode(text, add_special_tokens=False)
    assert tok.special_tokens()["<|im_start|>"] in r["encode"]  # special tokens in the text are recognised
    assert r["decode"] == tok.decode(r["encode"])
    vocab = tok.vocabulary()
    assert r["vocab_len"] == len(vocab)
    assert {int(i): bytes.fromhex(h) for i, h in r["vocab_hex"].items()} == {int(i): vocab[int(i)] for i in r["vocab_hex"]}
    assert {t: i for t, i in r["special"]} == tok.special_tokens()
    assert r["chat"] == tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    served = host.model("tiny")
    assert r["scheduling"] == {"decode_run": served.decode_run_length, "queue_ahead": served.decodes_one_ahead}


def test_scheduling_hints_follow_the_server_while_it_runs(engine, core, probe):
    """runtime.scheduling reads the server's settings at each call: an operator
    change reaches the next generation, not only instances launched after it."""
    host = Host([ServedModel("tiny", engine, core, queue_ahead=True, decode_run=3)], guest_output=lambda *a: None)
    assert _ok_json(run(host, probe, "info"))["scheduling"] == {"decode_run": 3, "queue_ahead": True}
    host.model("tiny").queue_ahead, host.model("tiny").decode_run = False, 1
    assert _ok_json(run(host, probe, "info"))["scheduling"] == {"decode_run": 1, "queue_ahead": False}


@pytest.mark.parametrize("how", ["single", "next", "run5"])
def test_raw_prefill_decode_loop_equals_engine_greedy(host, probe, engine, core, tiny_llama_model, how):
    """Every way of running a pass (`forward` + `get` per token, each pass
    queued one ahead with `feed-previous`, and runs of 5 passes per
    `forward` call with `draws`, across page boundaries) gives the engine's tokens."""
    prompt = "The quick brown fox"
    r = _ok_json(run(host, probe, "generate", prompt, "12", how))
    expected = engine_greedy(tiny_llama_model, engine.tokenizer.encode(prompt), 12)
    assert r["tokens"] == expected
    _assert_pool_restored(core)


# --------------------------------------------------------------------------- error paths


def test_bad_arguments_are_errors_for_the_guest_and_the_host_keeps_serving(host, probe, core):
    r = _ok_json(run(host, probe, "errors", "5"))
    assert r == {
        "decode_out_of_vocab": "invalid-argument",
        "open_unknown_model": "not-found",
        "free_unknown_page": "not-found",
        "copy_unknown_page": "not-found",
        "mask_out_of_range": "invalid-argument",
        "forward_unknown_page": "not-found",
        "forward_positions_length": "invalid-argument",
        "forward_bad_token": "invalid-argument",
        "forward_bad_last_page_len": "invalid-argument",
        "forward_mask_rows": "invalid-argument",
        "forward_mask_sum": "invalid-argument",
        "sample_allowed_sum": "invalid-argument",
        "output_index": "invalid-argument",
        "forward_feed_previous_first": "invalid-argument",
        "forward_run_mask": "invalid-argument",
        "forward_run_no_sample": "invalid-argument",
        "forward_run_draw_index": "invalid-argument",
        "forward_run_too_few_slots": "invalid-argument",
        "forward_run_past_max_positions": "invalid-argument",
        "export_first": "ok",
        "export_taken_name": "already-exists",
        "import_unknown": "not-found",
        "unexport_unknown": "not-found",
        "allocate_too_many": "out-of-memory",
        # Key-value and messaging calls report bad input as error results (no trap).
        "kv_set_long_key": "invalid-argument",
        "send_too_large": "invalid-argument",
        "broadcast_long_topic": "invalid-argument",
        "subscribe_long_topic": "invalid-argument",
        "still_serving": "ok",
        # `allowed` let only token 5 through (BRLE [5, 1, rest]).
        "allowed_token": 5,
    }
    _assert_pool_restored(core)


def test_failing_instances_end_cleanly_while_another_finishes(host, probe, core, engine, tiny_llama_model):
    """Trap, endless loop (CPU limit), out of memory, terminate, err result: each ends with
    a clear outcome and its pages back in the pool; a concurrent generation is unaffected."""
    prompt = "Once upon a time"
    limits = InstanceLimits(cpu_seconds=1.0, memory_bytes=96 << 20)
    good = launch(host, probe, "generate", prompt, "10")
    trap = launch(host, probe, "hold_pages", "3", "trap")
    loop = launch(host, probe, "loop", "hold", limits=limits)
    oom = launch(host, probe, "oom", "hold", limits=limits)
    err = launch(host, probe, "err")
    blocked = launch(host, probe, "block", "hold")
    time.sleep(0.5)
    blocked.terminate("test says stop")

    t, lp, om, er, bl = (i.wait(120) for i in (trap, loop, oom, err, blocked))
    assert t.status == "trap" and "RuntimeError: trap while holding pages" in t.error
    assert lp.status == "cpu-limit" and "CPU time limit" in lp.error
    assert 1.0 <= lp.cpu_seconds < 3.0
    assert om.status == "trap" and "MemoryError" in om.error
    assert er.status == "error" and er.error == "deliberate error result"
    assert bl.status == "terminated" and "test says stop" in bl.error

    g = _ok_json(good.wait(120))
    assert g["tokens"] == engine_greedy(tiny_llama_model, engine.tokenizer.encode(prompt), 10)
    _assert_pool_restored(core)


def test_cpu_limit_does_not_count_time_blocked_in_the_host(bare_host, probe):
    client = ClientChannel()
    inst = launch(bare_host, probe, "block", client=client, limits=InstanceLimits(cpu_seconds=0.5))
    time.sleep(1.5)  # three times the CPU limit, spent waiting for a message
    assert not inst.outcome.done()
    client.deliver("late message")
    out = inst.wait(30)
    assert out.ok and out.value == "late message"
    assert out.cpu_seconds < 0.5 < out.wall_seconds


def _wait_for_churn(inst, n):
    # arguments + n x (receive, pollable, ready, subscribe, next) + the final receive and get
    deadline = time.time() + 30
    while inst.context.host_calls < 3 + 5 * n and time.time() < deadline:
        time.sleep(0.01)
    assert inst.context.host_calls == 3 + 5 * n


def test_dropped_handles_are_released(bare_host, probe):
    client = ClientChannel()
    inst = launch(bare_host, probe, "churn", "300", client=client)
    _wait_for_churn(inst, 300)
    # 300 x (receive, pollable, subscription, next) were dropped: only the final receive is live.
    assert len(inst.context.table) == 1
    assert bare_host.broker.subscriber_count("churn") == 0
    client.deliver("done")
    assert inst.wait(30).value == "done"
    assert len(inst.context.table) == 0


def test_a_dropped_pending_receive_does_not_swallow_a_message(bare_host, probe):
    client = ClientChannel()
    inst = launch(bare_host, probe, "churn", "5", client=client)
    _wait_for_churn(inst, 5)  # five receives were taken and dropped unresolved
    client.deliver("first")
    assert inst.wait(30).value == "first"


# --------------------------------------------------------------------------- messaging, kvstore


def test_send_receive_round_trip(bare_host, probe):
    client = ClientChannel()
    for line in ("hello", "wörld", ""):
        client.deliver(line)
    client.close_input()
    out = run(bare_host, probe, "echo", client=client)
    assert out.ok and out.value == "echoed 3"
    assert client.sent == ["HELLO", "WÖRLD", ""]


def test_broadcast_reaches_every_subscriber(bare_host, probe):
    subs = [launch(bare_host, probe, "sub", "news", "3") for _ in range(2)]
    pub = launch(bare_host, probe, "pub", "news", "3", "2")
    assert pub.wait(60).ok
    for s in subs:
        assert _ok_json(s.wait(60)) == {"got": ["msg-0", "msg-1", "msg-2"]}
    assert bare_host.broker.subscriber_count() == 0  # ended instances unsubscribed


def test_kvstore_is_shared_within_a_namespace_and_isolated_across(bare_host, probe):
    assert run(bare_host, probe, "kv", "write", "greeting", "hi alice", namespace="alice").ok
    assert run(bare_host, probe, "kv", "write", "other", "x", namespace="alice").ok
    same = json.loads(run(bare_host, probe, "kv", "read", "greeting", namespace="alice").value)
    other = json.loads(run(bare_host, probe, "kv", "read", "greeting", namespace="bob").value)
    assert same == {"value": "hi alice", "keys": ["greeting", "other"], "deleted_missing": False}
    assert other == {"value": None, "keys": [], "deleted_missing": False}


def test_poll_times_out_then_reports_the_ready_handle(bare_host, probe):
    r = _ok_json(run(bare_host, probe, "poll"))
    assert r == {"timed_out": [], "ready": [1], "value": "wake", "ready_flag": True}


# --------------------------------------------------------------------------- pure parts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=64))
def test_brle_round_trip(bits):
    runs = encode_brle(bits)
    assert runs[0] >= 0 and all(r > 0 for r in runs[1:])
    assert decode_brle(runs, len(bits), "x").tolist() == bits


def test_brle_with_the_wrong_total_is_invalid():
    with pytest.raises(PieError) as e:
        decode_brle([0, 3, 2], 6, "mask row 0")
    assert e.value.code == "invalid-argument" and "sum to 5, expected 6" in e.value.message


def test_capabilities_need_both_the_operator_and_the_manifest(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    ro, rw = str((tmp_path / "ro").resolve()), str((tmp_path / "rw").resolve())
    allow = Capabilities.parse(f"fs:{ro},fs-rw:{rw},launch")
    assert allow == Capabilities(fs=(ro,), fs_rw=(rw,), launch=True)
    assert allow.grant([]) == Capabilities()
    assert allow.grant(["launch"]) == Capabilities(launch=True)
    assert allow.grant(["fs"]) == Capabilities(fs=(ro,), fs_rw=(rw,))
    assert Capabilities.parse("").grant(["fs", "launch"]) == Capabilities()
    # The names a manifest may declare (pie-build checks them) grant the same.
    from inferlet_toolchain.manifest import CAPABILITIES

    assert {"filesystem", "launch"} <= set(CAPABILITIES)
    assert allow.grant(["filesystem", "launch"]) == allow.grant(["fs", "launch"])
    assert allow.grant(["network"]) == Capabilities()  # never granted
    with pytest.raises(ValueError, match="unknown capability"):
        Capabilities.parse("gpu")
    with pytest.raises(ValueError, match="network access cannot be granted"):
        Capabilities.parse("net")
    with pytest.raises(ValueError, match="not a directory"):
        Capabilities.parse(f"fs:{tmp_path / 'missing'}")


def test_kvstore_and_broker_units():
    kv = KVStore()
    a, b = kv.namespace("a"), kv.namespace("b")
    a.set("k1", "v")
    a.set("k2", "w")
    assert a.get("k1") == "v" and b.get("k1") is None
    assert a.list_keys("k") == ["k1", "k2"] and a.delete("k1") and not a.delete("k1")
    broker = Broker()
    s1, s2 = broker.subscribe("t"), broker.subscribe("t")
    elsewhere = broker.subscribe("t", namespace="other-user")
    f1 = s1.next()
    assert broker.broadcast("t", "m") == 2  # topics are namespaced
    assert not elsewhere.next().done()
    assert f1.result(1) == "m" and s2.next().result(1) == "m"
    s1.close()
    assert broker.subscriber_count("t") == 1
    with pytest.raises(PieError) as e:
        s1.next().result(1)
    assert e.value.code == "closed"


def test_commands_queued_before_a_normal_return_still_take_effect(host, probe, core):
    # The guest enqueues a forward and a persistent export and returns without
    # waiting: the export must still be published once the forward has run.
    exporter = launch(host, probe, "export_and_return", "last-words")
    assert exporter.wait(120).ok, exporter.wait().describe()
    imported = _ok_json(launch(host, probe, "import", "last-words").wait(120))
    assert imported == {"pages": 1, "last_page_len": 3}
    _assert_pool_restored(core)
