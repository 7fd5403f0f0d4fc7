"""chat.py: turns arrive over stdin; the KV cache is kept between turns."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

SYSTEM = "You are terse."
TURNS = ["Hello there, who are you?", "Tell me about iterators."]
MAX_TOKENS = 6


@pytest.mark.parametrize("options", [("--queue-ahead", "off", "--decode-run", "4"), ("--queue-ahead", "on")],
                         ids=["runs", "queue-ahead"])
def test_second_turn_prefills_only_new_tokens_and_equals_a_cold_run(samples, pie_run, oracle, options):
    """With decode runs and with each pass queued one ahead: the passes run
    past a turn's last token are rolled back, so the next turn continues from
    exactly the KV of the turns so far."""
    run = pie_run(samples["chat"], "--system", SYSTEM, "--max-tokens", MAX_TOKENS, stdin="\n".join(TURNS) + "\n",
                  options=options)
    first, second = run.sent_json()
    assert run.result == "2 turns"

    tok = oracle.tokenizer
    specials = tok.special_tokens()
    stop = {*tok.eos_token_ids, specials["<|im_end|>"]}
    conversation = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]

    # Turn 1 from scratch: the rendered conversation, then greedy decoding.
    prompt1 = tok.encode(tok.apply_chat_template(conversation, add_generation_prompt=True))
    expected1 = oracle.greedy(prompt1, MAX_TOKENS, stop)
    assert first["prefilled"] == first["context"] == len(prompt1)
    assert first["tokens"] == [t for t in expected1 if t not in stop]

    # Turn 2 cold: the whole conversation so far as one token sequence (the
    # reply as the tokens drawn, not re-tokenized text), then greedy decoding.
    before = tok.apply_chat_template(conversation, add_generation_prompt=True) + first["reply"]
    conversation += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": TURNS[1]}]
    rendered = tok.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered.startswith(before)
    new_part = tok.encode(rendered[len(before):])
    prompt2 = prompt1 + first["tokens"] + new_part
    expected2 = oracle.greedy(prompt2, MAX_TOKENS, stop)
    assert second["tokens"] == [t for t in expected2 if t not in stop]
    assert second["context"] == len(prompt2)

    # Only the new part went through the model (plus the last reply token,
    # which is still pending when a reply ends at max-tokens, not at EOS).
    carried = 1 if first["stop"] == "max-tokens" else 0
    assert second["prefilled"] == len(new_part) + carried
    assert second["context"] - second["prefilled"] >= len(prompt1)  # turn 1 was not recomputed
