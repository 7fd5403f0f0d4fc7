"""Small helpers shared by the engine tests: running prompts through pages and reading log-probs."""

from __future__ import annotations

import numpy as np
import torch

from engine_jax.batch import ForwardRequest, Logprobs
from engine_jax.engine import Engine


def all_logprobs(index: int, vocab_size: int) -> Logprobs:
    return Logprobs(index=index, token_ids=tuple(range(vocab_size)))


def hf_logprobs(hf_model, tokens: list[int], positions: list[int] | None = None) -> np.ndarray:
    """transformers' log-softmax over the vocabulary at every token ``[len(tokens), vocab]``."""
    with torch.no_grad():
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.tensor([positions])
        logits = hf_model(torch.tensor([tokens]), **kwargs).logits[0]
        return torch.log_softmax(logits.double(), dim=-1).numpy()


def request(engine: Engine, tokens, positions, pages, seq_len: int, with_logprobs=True, **kwargs) -> ForwardRequest:
    """A request whose sequence is ``seq_len`` slots long after the step, over ``pages``."""
    ps = engine.page_size
    needed = -(-seq_len // ps)
    assert len(pages) >= needed, f"test bug: {seq_len} slots need {needed} pages, got {len(pages)}"
    used = pages[:needed]
    outputs = [all_logprobs(i, engine.config.vocab_size) for i in range(len(tokens))] if with_logprobs else []
    return ForwardRequest(tokens=list(tokens), positions=list(positions), pages=list(used),
                          last_page_len=(seq_len - 1) % ps + 1, outputs=outputs, **kwargs)


def step_logprobs(engine: Engine, req: ForwardRequest) -> np.ndarray:
    [result] = engine.step([req])
    return np.array(result)
