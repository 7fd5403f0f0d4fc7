"""32 clients at once on one server: WebSocket inferlets and OpenAI streams, all correct, batched together."""

from __future__ import annotations

import asyncio

import openai

from pie_client import PieClient

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "A list of fruits:"]
MAX_TOKENS = 10


def test_32_mixed_clients_get_their_solo_results_and_share_engine_steps(server, samples_built):
    component = samples_built("text_completion")
    api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.tokens["bob"], max_retries=0, timeout=300)

    async def inferlet(client, program, prompt):
        instance = await client.launch(program, ["--prompt", prompt, "--max-tokens", str(MAX_TOKENS)])
        return await instance.wait()

    async def chat(prompt):
        stream = await api.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=MAX_TOKENS, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def go():
        async with PieClient(server.ws_url, token=server.tokens["alice"]) as client:
            program = await client.upload(component)
            solo_inferlet = {p: await inferlet(client, program, p) for p in PROMPTS}
            solo_chat = {p: await chat(p) for p in PROMPTS}
            before = server.metrics()
            jobs = [inferlet(client, program, PROMPTS[i % 4]) for i in range(16)]
            jobs += [chat(PROMPTS[i % 4]) for i in range(16)]
            results = await asyncio.gather(*jobs)
            return solo_inferlet, solo_chat, results, before, server.metrics()

    solo_inferlet, solo_chat, results, before, after = asyncio.run(asyncio.wait_for(go(), 600))
    assert results[:16] == [solo_inferlet[PROMPTS[i % 4]] for i in range(16)]
    assert results[16:] == [solo_chat[PROMPTS[i % 4]] for i in range(16)]
    assert len(set(solo_inferlet.values())) > 1 and len(set(solo_chat.values())) > 1
    steps = after["pie_batch_requests_count"] - before["pie_batch_requests_count"]
    single = after["pie_batch_requests_bucket{le=1.0}"] - before["pie_batch_requests_bucket{le=1.0}"]
    assert steps > 0 and single < steps  # some steps carried more than one request
    assert after["pie_batch_requests_sum"] - before["pie_batch_requests_sum"] > steps
