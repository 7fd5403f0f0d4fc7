"""A server of its own, tensor parallel over two forced CPU devices: the same greedy completion as
pie-run on one device, admission limits per tenant, and the SIGTERM drain (503, no new instances,
running ones finish until the deadline, the rest are terminated, exit status 0)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

from pie_client import PieClient, PieClientError
from pie_runtime.messaging import frame_line
from tests.server.conftest import MAX_TOKENS, PROMPT, start_server

DRAIN_SECONDS = 8


def test_tensor_parallel_answers_like_one_device_then_limits_and_drain(server_model_dir, samples_built, tmp_path,
                                                                       pie_run_plain):
    chat, completion = samples_built("chat"), samples_built("text_completion")
    server = start_server(server_model_dir, tmp_path, "--max-tenant-instances", "2",
                          "--drain-seconds", str(DRAIN_SECONDS), "--tensor-parallel", "2",
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        assert "tensor parallel over 2 cpu devices" in server.log()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.tokens["alice"], max_retries=0,
                               timeout=300)
        reply = client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS)
        assert frame_line(reply.choices[0].text) == pie_run_plain

        async def go():
            async with PieClient(server.ws_url, token=server.tokens["alice"]) as a, \
                    PieClient(server.ws_url, token=server.tokens["bob"]) as b:
                chat_a, completion_b = await a.upload(chat), await b.upload(completion)
                held = [await a.launch(chat_a, []) for _ in range(2)]
                with pytest.raises(PieClientError) as over:
                    await a.launch(chat_a, [])
                # bob is not affected by alice's limit
                finishing = await b.launch(completion_b, ["--max-tokens", "40"])
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                health = httpx.get(server.url + "/health", timeout=10)
                with pytest.raises(PieClientError) as refused:
                    await b.launch(completion_b, [])
                finished = [event async for event in finishing.events()][-1]
                blocked = [event async for event in held[0].events()][-1]
                return over.value.code, health, refused.value.code, finished, blocked

        started = time.monotonic()
        over, health, refused, finished, blocked = asyncio.run(asyncio.wait_for(go(), 300))
        assert over == "limit"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert refused == "unavailable"
        assert finished.kind == "result"  # it ended by itself within the drain
        assert blocked.kind == "error" and blocked.data["status"] == "terminated"  # waited on receive past the deadline
        assert time.monotonic() - started >= DRAIN_SECONDS - 1
        assert server.process.wait(60) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
