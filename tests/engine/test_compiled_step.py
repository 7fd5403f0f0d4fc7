"""Structural checks of the compiled step: the KV pool is updated in place, and other attention backends agree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine_jax.batch import Distribution, ForwardRequest, Sample
from engine_jax.engine import Engine
from tests.engine.engine_utils import request, step_logprobs


def test_step_updates_the_donated_pool_without_copying_it(tiny_llama_model):
    # 999 pages makes the cache shape unmistakable in the HLO text.
    engine = Engine(tiny_llama_model, page_size=8, num_pages=999)
    c = engine.config
    pages = [engine.pool.alloc(3) for _ in range(4)]
    requests = [ForwardRequest(tokens=[7], positions=[20], pages=p, last_page_len=5,
                               outputs=(Sample(index=0, temperature=1.0, top_p=0.9), Distribution(index=0, k=4)))
                for p in pages]
    hlo = engine.step_hlo(requests)
    layer_shape = f"[999,8,{c.num_kv_heads},{c.head_dim}]"
    header = hlo.splitlines()[0]
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", header).group(1)
    # K and V of every layer plus the valid bits are aliased to outputs (donated, updated in place).
    assert aliases.count("may-alias") == 2 * c.num_layers + 1
    entry = hlo[hlo.index("\nENTRY"):]
    for line in entry.splitlines():
        if layer_shape in line.split("=", 1)[-1].split("(", 1)[0]:
            op = line.split("=", 1)[1]
            assert not re.search(r"\b(copy|copy-start|transpose)\(", op), line
            assert "scatter" in line or "parameter(" in line or "tuple(" in line, line
    assert engine.step(requests)  # and it runs


def test_kernel_in_interpret_mode_matches_the_reference(tiny_llama_model):
    tokens = tiny_llama_model.tokenizer.encode("Return a new list containing all items from the iterable")
    results = []
    for attention in ("reference", "interpret"):
        engine = Engine(tiny_llama_model, page_size=4, num_pages=8, attention=attention)
        pages = engine.pool.alloc(4)
        first = step_logprobs(engine, request(engine, tokens[:6], range(6), pages, 6))
        mask = np.tril(np.ones((4, 10), bool), 6)
        mask[:, 1] = False
        second = step_logprobs(engine, request(engine, tokens[6:10], range(6, 10), pages, 10, mask=mask))
        results.append(np.concatenate([first, second]))
    np.testing.assert_allclose(results[1], results[0], atol=2e-5)
