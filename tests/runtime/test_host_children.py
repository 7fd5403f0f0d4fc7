"""runtime.launch end to end: the probe guest starts children of itself (or of a
registered program) on a real host, serving core and engine.

The probe has no manifest, so its capabilities come from the test (`grant`),
as a manifest-less component's do from pie-run: none.
"""

from __future__ import annotations

import json
import time

import pytest

from inferlet_toolchain.inferlet.args import ArgSpec
from inferlet_toolchain.manifest import Manifest
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.registry import Host, Program, ServedModel
from pie_runtime.instance import InstanceLimits
from pie_runtime.limits import TenantLimits
from pie_runtime.messaging import ClientChannel
from tests.runtime.guests.fixtures import NUM_PAGES, engine_greedy, launch

LAUNCH = Capabilities(launch=True)


@pytest.fixture()
def host(engine, core):
    """A fresh host per test: registered programs and the kvstore do not carry over."""
    return Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None)


def _ok_json(outcome):
    assert outcome.ok, outcome.describe()
    return json.loads(outcome.value)


def _assert_pool_restored(core):
    # No waiting: a parent's outcome comes only after its children released everything.
    assert core.free_pages() == NUM_PAGES
    assert core.held_pages() == 0
    core.check_invariants()


def _wait_for_keys(host, prefix, count, timeout=60.0):
    kv = host.kvstore.namespace("default")
    deadline = time.time() + timeout
    while len(kv.list_keys(prefix)) < count:
        assert time.time() < deadline, f"only {kv.list_keys(prefix)} under {prefix!r}"
        time.sleep(0.02)


def test_concurrent_children_return_their_results_in_launch_order(host, probe):
    # Five instances of 256 MiB fit the launch tree's default 4 GiB; of 1 GiB they would not.
    parent = launch(host, probe, "launch_self", "4", "runtime", "child-{i}", grant=LAUNCH,
                    limits=InstanceLimits(memory_bytes=256 << 20))
    r = _ok_json(parent.wait(120))
    children = [json.loads(result) for result in r["results"]]
    assert [c["arguments"] for c in children] == [["runtime", f"child-{i}"] for i in range(4)]
    assert len({c["instance_id"] for c in children} | {parent.instance_id}) == 5


def test_children_generate_like_the_engine_and_their_pages_are_released(host, probe, core, engine,
                                                                         tiny_llama_model):
    prompt = "The quick brown fox"
    parent = launch(host, probe, "launch_self", "3", "generate", prompt, "6", grant=LAUNCH)
    holder = launch(host, probe, "launch_self", "3", "hold_pages", "{i}", grant=LAUNCH)
    expected = engine_greedy(tiny_llama_model, engine.tokenizer.encode(prompt), 6)
    assert [json.loads(t)["tokens"] for t in _ok_json(parent.wait(120))["results"]] == [expected] * 3
    # hold_pages children end without freeing their pages: their teardown must.
    assert _ok_json(holder.wait(120))["results"] == ["held"] * 3
    _assert_pool_restored(core)


def test_children_messages_go_to_the_parents_client_tagged_with_the_child(host, probe):
    client = ClientChannel()
    r = _ok_json(launch(host, probe, "launch_self", "2", "say", "hello-{i}", client=client,
                        grant=LAUNCH).wait(120))
    child_ids = r["results"]
    assert sorted(client.sent) == sorted(f"[{cid}] hello-{i}" for i, cid in enumerate(child_ids))


@pytest.mark.parametrize("how", ["return", "terminate", "trap"])
def test_a_parent_that_ends_terminates_its_running_children(host, probe, core, how):
    client = ClientChannel()
    parent = launch(host, probe, "launch_many", "3", "park", "2", client=client, grant=LAUNCH)
    _wait_for_keys(host, "parked/", 3)
    assert core.held_pages() == 6
    if how == "return":
        client.deliver("go")
    elif how == "terminate":
        parent.terminate("test ends the parent")
    else:
        client.close_input()  # the parent's receive fails: it traps
    outcome = parent.wait(120)
    assert outcome.status == {"return": "ok", "terminate": "terminated", "trap": "trap"}[how], outcome.describe()
    assert len(parent.children) == 3
    for child in parent.children:
        assert child.outcome.done()  # the parent's outcome waited for them
        out = child.outcome.result()
        assert out.status == "terminated" and f"its parent {parent.instance_id} ended" in out.error
    _assert_pool_restored(core)


def test_live_instances_of_a_launch_tree_are_limited(engine, core, probe):
    host = Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None,
                limits=TenantLimits(max_tree_instances=3))
    client = ClientChannel()
    parent = launch(host, probe, "launch_many", "5", "park", client=client, grant=LAUNCH)
    _wait_for_keys(host, "launched/", 1)
    client.deliver("go")
    r = _ok_json(parent.wait(120))
    assert r["started"] == 2  # the parent and two children make three
    assert r["refused"]["code"] == "out-of-memory" and "max_tree_instances" in r["refused"]["message"]
    _assert_pool_restored(core)


def test_launch_depth_is_limited(engine, core, probe):
    host = Host([ServedModel("tiny", engine, core)], guest_output=lambda *a: None,
                limits=TenantLimits(max_launch_depth=2))
    r = _ok_json(launch(host, probe, "deep", grant=LAUNCH).wait(120))
    assert r["level"] == 2
    assert r["code"] == "unsupported" and "launch depth" in r["message"]


def test_launch_needs_the_capability(host, probe):
    r = _ok_json(launch(host, probe, "launch_one", "", "runtime").wait(60))
    assert r["code"] == "unsupported" and "'launch' capability" in r["message"]


def test_unknown_program_and_bad_arguments_are_refused(host, probe):
    strict = Manifest(name="strict", arguments=[ArgSpec("count", "int", required=True, help="how many")])
    host.register_program(Program("strict", probe, strict))
    host.register_program(Program("plain", probe))
    unknown = _ok_json(launch(host, probe, "launch_one", "no-such-program", "runtime", grant=LAUNCH).wait(60))
    assert unknown["code"] == "not-found" and "'no-such-program'" in unknown["message"]
    bad = _ok_json(launch(host, probe, "launch_one", "strict", "--count", "many", grant=LAUNCH).wait(60))
    assert bad["code"] == "invalid-argument" and "count" in bad["message"]
    plain = _ok_json(launch(host, probe, "launch_one", "plain", "runtime", "x", grant=LAUNCH).wait(60))
    assert json.loads(plain["result"])["arguments"] == ["runtime", "x"]


def test_a_failing_child_is_an_error_for_the_parent_not_a_crash(host, probe):
    r = _ok_json(launch(host, probe, "launch_one", "", "trap", grant=LAUNCH).wait(60))
    assert r["code"] == "internal"
    assert "trap" in r["message"] and "deliberate failure in the guest" in r["message"]
