"""The OpenAI-compatible API of a real pie-serve, through the official `openai` client.

Greedy results must equal what `pie-run` prints for the same prompt (the
text_completion sample, run on this machine with the same model); streamed
chunks must concatenate to the whole answer; grammars, seeds, `n`, stop
strings and usage must behave as OpenAI documents; bad requests get 400s
in OpenAI's error shape.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from pie_runtime.messaging import frame_line
from tests.server.conftest import MAX_TOKENS, PAGE_SIZE, PROMPT, pie_run_locally


@pytest.fixture(scope="module")
def pie_run_chat(server_model_dir, samples_built):
    return pie_run_locally(server_model_dir, samples_built("text_completion"), "--prompt", PROMPT, "--chat",
                           "--max-tokens", str(MAX_TOKENS))


def test_models_lists_the_served_model_and_the_exposed_program(server, openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == [server.model, "shout"]


def test_an_exposed_program_answers_as_a_model(server, openai_client):
    messages = [{"role": "user", "content": "hello there"}]
    whole = openai_client.chat.completions.create(model="shout", messages=messages)
    assert whole.choices[0].message.content == "HELLO THERE!"
    chunks = [c.choices[0].delta.content or "" for c in
              openai_client.chat.completions.create(model="shout", messages=messages, stream=True) if c.choices]
    assert chunks[1:] == ["HELLO", " THERE", "!", ""]  # role chunk, its two sends, its result, the finish
    assert openai_client.completions.create(model="shout", prompt="abc").choices[0].text == "ABC!"


def test_greedy_chat_equals_pie_run(server, openai_client, pie_run_chat):
    reply = openai_client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=MAX_TOKENS)
    assert frame_line(reply.choices[0].message.content) == pie_run_chat
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX_TOKENS


def test_greedy_completion_equals_pie_run_and_stream_concatenates(server, openai_client, pie_run_plain):
    whole = openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS)
    assert frame_line(whole.choices[0].text) == pie_run_plain
    chunks = list(openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                                   max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_chat_chunks_concatenate_to_the_whole_reply(server, openai_client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    whole = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=10)
    stream = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                   max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last
    assert chunks[-1].choices == []


def test_n_with_a_seed_is_reproducible(server, openai_client):
    def ask():
        reply = openai_client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "Tell me a story."}], n=3, seed=1234,
            temperature=1.0, max_tokens=8)
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = ask()
    assert len(first) == 3
    assert ask() == first
    assert len(set(first)) > 1  # each choice draws its own tokens


def test_stop_string_ends_the_text_before_it(server, openai_client):
    plain = openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                             max_tokens=MAX_TOKENS).choices[0].text
    stop = plain[4:7]
    assert stop and stop in plain
    reply = openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                             max_tokens=MAX_TOKENS, stop=[stop])
    assert reply.choices[0].text == plain[:plain.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                                max_tokens=MAX_TOKENS, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_json_schema_response_format_parses_and_validates(server, openai_client):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}
    for temperature in (0.0, 1.0):
        reply = openai_client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "A colour and a count, as JSON."}],
            temperature=temperature, seed=7, max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"colour", "count"}
        assert value["colour"] in ("red", "green", "blue")
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 9


def test_a_shared_system_prompt_is_prefilled_once(server, openai_client):
    system = "You are a careful assistant. " * 12  # many KV pages of a shared prefix
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there."}]

    def ask():
        before = server.metrics()["pie_tokens_processed_total"]
        reply = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                      max_tokens=6)
        return reply, server.metrics()["pie_tokens_processed_total"] - before

    first, first_processed = ask()
    second, second_processed = ask()
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert cached >= 3 * PAGE_SIZE and cached % PAGE_SIZE == 0
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second_processed == first_processed - cached  # the server ran the prefix's tokens only once


@pytest.mark.parametrize("body, status, code", [
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, 400, "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "unsupported_parameter"),
    ({"messages": []}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ({}, 400, "missing_required_parameter"),
])
def test_bad_chat_requests_get_openai_errors(server, body, status, code):
    body = {"model": server.model, **body} if body else {"model": server.model}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {server.tokens['alice']}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]


def test_unknown_model_bad_json_and_bad_tokens(server, openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    headers = {"Authorization": f"Bearer {server.tokens['alice']}", "Content-Type": "application/json"}
    reply = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers, timeout=30)
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-nobody-0000000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    anonymous = httpx.get(server.url + "/v1/models", timeout=30)
    assert anonymous.status_code == 401


@pytest.fixture(scope="module")
def hf_greedy(server_model_dir):
    """Transformers' own greedy continuation of PROMPT and each step's log-softmax (the truth the
    server's log-probabilities must match), with the prompt tokenised as the completion program does."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_directory(server_model_dir)
    ids = tokenizer.encode(PROMPT)
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_pretrained(server_model_dir, torch_dtype=torch.float32).eval()
    steps = []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
            token = int(logprobs.argmax())
            steps.append((token, logprobs))
            ids.append(token)
    return steps, tokenizer.vocabulary()


def test_completion_logprobs_are_the_models_own(server, openai_client, hf_greedy):
    steps, vocabulary = hf_greedy
    reply = openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                             max_tokens=MAX_TOKENS, logprobs=3)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX_TOKENS
    # A random model draws byte fragments: the tokens' bytes, not their texts, make up the text.
    assert b"".join(vocabulary[t] for t, _ in steps).decode("utf-8", errors="replace") == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(MAX_TOKENS)]
    for (token, truth), text, logprob, top in zip(steps, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert text == vocabulary[token].decode("utf-8", errors="backslashreplace")
        assert logprob == pytest.approx(truth[token], abs=1e-4)
        best = sorted(range(len(truth)), key=lambda t: -truth[t])[:3]
        assert list(top.values()) == pytest.approx([truth[t] for t in best], abs=1e-4)
        assert set(top) <= {vocabulary[t].decode("utf-8", errors="backslashreplace") for t in best}
    streamed = list(openai_client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                                     max_tokens=MAX_TOKENS, logprobs=3, stream=True))
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens
    assert sum((p.token_logprobs for p in parts), []) == lp.token_logprobs
    assert sum((p.text_offset for p in parts), []) == lp.text_offset


def test_chat_logprobs_stream_and_sampled_draws(server, openai_client):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                  max_tokens=10, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    text = b"".join(bytes(item.bytes) for item in content).decode("utf-8", errors="replace")
    assert text == whole.choices[0].message.content
    for item in content:  # greedy: the drawn token is the most likely one
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert item.logprob == item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    stream = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=0,
                                                   max_tokens=10, logprobs=True, top_logprobs=2, stream=True)
    streamed = [item for c in stream if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]
    sampled = openai_client.chat.completions.create(model=server.model, messages=messages, temperature=1.5,
                                                    seed=5, max_tokens=10, logprobs=True, n=2)
    for choice in sampled.choices:  # no alternatives asked for; each draw's own log-probability
        items = choice.logprobs.content
        assert items and all(i.top_logprobs == [] and i.logprob <= 0 for i in items)
        assert b"".join(bytes(i.bytes) for i in items).decode("utf-8", errors="replace") == choice.message.content
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {server.tokens['alice']}"},
                       json={"model": server.model, "messages": messages, "top_logprobs": 2})
    assert reply.status_code == 400 and "logprobs" in reply.json()["error"]["message"]
