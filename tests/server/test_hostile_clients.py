"""Hostile and broken clients: every bad frame gets a clear error (or a clean close), the server keeps
serving everyone else, and nothing leaks (instances, KV pages, threads, open files)."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import msgpack
from websockets.asyncio.client import connect

from pie_client import PieClient
from pie_client.protocol import PROTOCOL_VERSION, WS_PATH


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


class Raw:
    """A WebSocket speaking frames by hand."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, op=None, raw=None, **fields):
        if raw is None:
            self.next_id += 1
            raw = msgpack.packb({"id": self.next_id, "op": op, **fields})
        await self.ws.send(raw)
        while True:
            frame = msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), 120))
            if "event" not in frame:
                return frame


async def raw_session(server, token_name="alice"):
    ws = await connect(server.ws_url + WS_PATH, max_size=None)
    raw = Raw(ws)
    hello = await raw.call("hello", protocol=PROTOCOL_VERSION, token=server.tokens[token_name])
    assert hello["ok"], hello
    return raw


def code_of(reply):
    assert reply["ok"] is False, reply
    assert reply["error"]["message"]
    return reply["error"]["code"]


def test_malformed_frames_and_requests_get_errors_and_the_connection_goes_on(server, samples_built):
    component = samples_built("text_completion").read_bytes()
    sha = hashlib.sha256(component).hexdigest()
    baseline = server.settled_counts()

    async def go():
        raw = await raw_session(server)
        codes = {
            "not msgpack": code_of(await raw.call(raw=b"\xc1\xff garbage")),
            "not a map": code_of(await raw.call(raw=msgpack.packb([1, 2, 3]))),
            "no id": code_of(await raw.call(raw=msgpack.packb({"op": "list"}))),
            "unknown op": code_of(await raw.call("explode")),
            "hello twice": code_of(await raw.call("hello", protocol=PROTOCOL_VERSION)),
            "bad hash": code_of(await raw.call("has_program", sha256="xyz")),
            "unknown program": code_of(await raw.call("launch", program="f" * 64, arguments=[])),
            "unknown name": code_of(await raw.call("launch", program="no-such-program")),
            "unknown instance": code_of(await raw.call("terminate", instance="1-nothing")),
            "instance not a string": code_of(await raw.call("send", instance=5, message="x")),
            "too large": code_of(await raw.call("upload_begin", sha256=sha, size=1 << 40)),
            "negative size": code_of(await raw.call("upload_begin", sha256=sha, size=-1)),
            "unknown upload": code_of(await raw.call("upload_chunk", upload=99, data=b"x")),
        }
        await raw.ws.send("a text frame")
        codes["text frame"] = code_of(msgpack.unpackb(await raw.ws.recv()))
        # An upload that sends more than it announced, then one whose bytes do not match their hash.
        up = (await raw.call("upload_begin", sha256=sha, size=4))["result"]["upload"]
        codes["overflow"] = code_of(await raw.call("upload_chunk", upload=up, data=b"12345"))
        up = (await raw.call("upload_begin", sha256=sha, size=4))["result"]["upload"]
        await raw.call("upload_chunk", upload=up, data=b"1234")
        codes["hash mismatch"] = code_of(await raw.call("upload_end", upload=up))
        junk = b"\0asm this is not a component"
        up = (await raw.call("upload_begin", sha256=hashlib.sha256(junk).hexdigest(), size=len(junk)))
        up = up["result"]["upload"]
        await raw.call("upload_chunk", upload=up, data=junk)
        codes["not a component"] = code_of(await raw.call("upload_end", upload=up))
        still_fine = await raw.call("list")
        await raw.ws.close()
        return codes, still_fine

    codes, still_fine = run(go())
    assert codes == {
        "not msgpack": "bad-request", "not a map": "bad-request", "no id": "bad-request",
        "unknown op": "bad-request", "hello twice": "bad-request", "bad hash": "bad-request",
        "unknown program": "not-found", "unknown name": "not-found", "unknown instance": "not-found",
        "instance not a string": "bad-request", "too large": "too-large", "negative size": "bad-request",
        "unknown upload": "not-found", "text frame": "bad-request", "overflow": "too-large",
        "hash mismatch": "invalid-argument", "not a component": "compile-failed",
    }
    assert still_fine["ok"] and still_fine["result"] == {"instances": []}
    server.assert_back_to(baseline)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_wrong_token_or_no_hello_is_refused_and_closed(server):
    async def attempt(first):
        async with connect(server.ws_url + WS_PATH) as ws:
            await ws.send(msgpack.packb(first))
            reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
            await asyncio.wait_for(ws.wait_closed(), 60)
            return reply, ws.close_code

    wrong, wrong_close = run(attempt({"id": 1, "op": "hello", "protocol": PROTOCOL_VERSION, "token": "sk-guess"}))
    early, early_close = run(attempt({"id": 1, "op": "list"}))
    assert code_of(wrong) == "unauthenticated" and wrong_close == 1008
    assert code_of(early) == "unauthenticated" and early_close == 1008

    async def old_client():
        async with connect(server.ws_url + WS_PATH) as ws:
            await ws.send(msgpack.packb({"id": 1, "op": "hello", "protocol": 99, "token": server.tokens["alice"]}))
            return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))

    assert code_of(run(old_client())) == "bad-request"


def test_a_client_vanishing_mid_stream_frees_its_instance(server, samples_built):
    """An OpenAI stream whose client drops the connection after the first chunk, and a WebSocket
    client killed without a close handshake: both instances end, everything is released."""
    chat = samples_built("chat")

    async def upload_first():
        async with PieClient(server.ws_url, token=server.tokens["alice"]) as client:
            await client.upload(chat)

    run(upload_first())
    baseline = server.settled_counts()
    body = {"model": server.model, "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
            "max_tokens": 400, "temperature": 1.0}
    headers = {"Authorization": f"Bearer {server.tokens['alice']}"}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        # leaving the block closes the connection mid-stream

    async def killed_client():
        client = PieClient(server.ws_url, token=server.tokens["alice"])
        await client.connect()
        instance = await client.launch(await client.upload(chat), [])
        await instance.send("Hi!")
        transport = client._ws.transport
        transport.abort()  # no close frame: the TCP connection just dies

    run(killed_client())
    server.assert_back_to(baseline)
