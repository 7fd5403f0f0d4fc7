"""The WebSocket client protocol of a real pie-serve, through pie_client and pie-run --server.

Uploads by hash, launch with checked arguments, event streams, messages,
terminate, list, detach/re-attach, disconnect, and the guarantee that every
path ends with the server's own counts (instances, KV pages, threads, open
files) back where they started.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import pytest

from pie_client import PieClient, PieClientError, SyncPieClient


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def alice(server) -> PieClient:
    return PieClient(server.ws_url, token=server.tokens["alice"])


def idle_baseline(server, *components):
    """The server's idle counts once `components` are uploaded (a compiled program keeps its
    mapped file open for the server's lifetime: that is a cache, not a leak)."""
    async def upload():
        async with alice(server) as client:
            for component in components:
                await client.upload(component)

    run(upload())
    return server.settled_counts()


def test_upload_is_by_hash_and_returns_the_manifest(server, samples_built):
    wasm = samples_built("text_completion").read_bytes()

    async def go():
        async with alice(server) as client:
            assert client.tenant == "alice" and client.server_info["models"] == [server.model]
            first = await client.upload(wasm)
            again = await client._request("has_program", sha256=hashlib.sha256(wasm).hexdigest())
            return first, again

    program, again = run(go())
    assert program.sha256 == hashlib.sha256(wasm).hexdigest()
    assert program.name == "text-completion"
    assert {a["name"] for a in program.manifest["arguments"]} >= {"prompt", "max-tokens"}
    assert "--prompt" in program.help
    assert again["present"] is True


def test_launch_streams_the_result_as_pie_run_server_prints_it(server, samples_built):
    from pie_runtime.cli import main

    component = samples_built("text_completion")
    args = ["--prompt", "Once upon a time", "--max-tokens", "10"]

    async def go():
        async with alice(server) as client:
            instance = await client.launch(await client.upload(component), args)
            return [event async for event in instance.events()]

    events = run(go())
    assert [e.kind for e in events] == ["result"]
    out, err = io.StringIO(), io.StringIO()
    code = main([str(component), "--server", server.ws_url, "--token", server.tokens["alice"], "-q", "--", *args],
                stdin=io.StringIO(""), stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    assert out.getvalue().splitlines()[-1] == events[0].data


def test_messages_go_both_ways_and_bad_arguments_are_refused(server, samples_built):
    component = samples_built("messaging")

    async def go():
        async with alice(server) as client:
            program = await client.upload(component)
            with pytest.raises(PieClientError) as refused:
                await client.launch(program, ["--loud"])
            instance = await client.launch(program, ["--upper"])
            await instance.send("hello")
            await instance.send("world")
            await instance.close_input()
            return refused.value, [event async for event in instance.events()]

    refused, events = run(go())
    assert refused.code == "invalid-argument" and "--loud" in refused.message
    assert [json.loads(e.data)["echo"] for e in events if e.kind == "message"] == ["HELLO", "WORLD"]
    assert events[-1].kind == "result" and events[-1].data == "2 messages"


def test_terminate_and_list(server, samples_built):
    component = samples_built("chat")
    baseline = idle_baseline(server, component)

    async def go():
        async with alice(server) as client:
            instance = await client.launch(await client.upload(component), [])
            await instance.send("Hi!")  # it answers, then waits for the next turn
            async for event in instance.events():
                if event.kind == "message":
                    break
            listed = await client.list()
            await instance.terminate()
            events = [event async for event in instance.events()]
            return instance.id, listed, events, await client.list()

    instance_id, listed, events, after = run(go())
    (entry,) = [e for e in listed if e["instance"] == instance_id]
    assert entry["program"] == "chat" and entry["state"] == "running" and entry["attached"] is True
    assert entry["age_seconds"] >= 0
    assert events[-1].kind == "error" and events[-1].data["status"] == "terminated"
    assert all(e["instance"] != instance_id for e in after)
    server.assert_back_to(baseline)


def test_detach_then_attach_from_another_connection_replays_buffered_events(server, samples_built):
    component = samples_built("messaging")
    baseline = idle_baseline(server, component)

    async def first_session():
        async with alice(server) as client:
            instance = await client.launch(await client.upload(component), [])
            await instance.detach()
            await instance.send("while nobody listens")
            return instance.id

    instance_id = run(first_session())  # the socket closes here: a detached instance lives on

    async def second_session():
        async with alice(server) as client:
            listed = {e["instance"]: e for e in await client.list()}
            instance = await client.attach(instance_id)
            await instance.send("and now")
            await instance.close_input()
            return listed, [event async for event in instance.events()]

    listed, events = run(second_session())
    assert listed[instance_id]["attached"] is False and listed[instance_id]["state"] == "running"
    assert [json.loads(e.data)["echo"] for e in events if e.kind == "message"] == ["while nobody listens", "and now"]
    assert events[-1].data == "2 messages"
    server.assert_back_to(baseline)


def test_a_client_that_disconnects_without_detaching_loses_its_instances(server, samples_built):
    component = samples_built("chat")
    baseline = idle_baseline(server, component)
    client = SyncPieClient(server.ws_url, token=server.tokens["alice"])
    instance = client.launch(client.upload(component), [])
    instance.send("Hi!")
    next(e for e in instance.events() if e.kind == "message")  # it holds KV pages now
    assert server.idle_counts()["kv_used"] > baseline["kv_used"]
    client.close()
    server.assert_back_to(baseline)

    async def gone():
        async with alice(server) as other:
            return await other.list()

    assert all(e["instance"] != instance.id for e in run(gone()))


def test_tenants_cannot_see_or_touch_each_other(server, samples_built):
    chat, kv_store = samples_built("chat"), samples_built("kv_store")

    async def go():
        async with alice(server) as a, PieClient(server.ws_url, token=server.tokens["bob"]) as b:
            assert b.tenant == "bob"
            program = await a.upload(chat)
            instance = await a.launch(program, [])
            denied = {}
            for op in ("attach", "send", "terminate", "close_input", "detach"):
                fields = {"instance": instance.id, **({"message": "x"} if op == "send" else {})}
                with pytest.raises(PieClientError) as e:
                    await b._request(op, **fields)
                denied[op] = e.value.code
            bob_list = await b.list()
            bob_has = await b._request("has_program", sha256=program.sha256)
            with pytest.raises(PieClientError) as launch_denied:
                await b.launch(program.sha256, [])
            await instance.terminate()
            stored = await (await a.launch(await a.upload(kv_store), ["--set", "secret=alice"])).wait()
            seen = await (await b.launch(await b.upload(kv_store), ["--get", "secret"])).wait()
            return denied, bob_list, bob_has, launch_denied.value.code, stored, seen

    denied, bob_list, bob_has, launch_code, stored, seen = run(go())
    assert set(denied.values()) == {"not-found"}
    assert bob_list == []
    assert bob_has["present"] is False and launch_code == "not-found"
    assert json.loads(stored)["got"] == {}
    assert json.loads(seen)["got"] == {"secret": None}
