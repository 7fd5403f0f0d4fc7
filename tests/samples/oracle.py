"""Independent answers for the sample-inferlet tests, computed by the engine alone.

No Wasm, no runtime, no SDK: one `Engine` on the same tiny checkpoint,
driven token by token with plain causal (or explicitly masked) forward
passes over fresh pages. Whatever an inferlet does with forks, exports,
masks or drafts, its greedy output must match these.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np

PAGE_SIZE = 4

# For a new token at absolute index i: which earlier slots j it may see.
Visibility = Callable[[int, int], bool]


class Oracle:
    def __init__(self, model) -> None:
        from engine_jax.engine import Engine

        self.tokenizer = model.tokenizer
        self.engine = Engine(model, page_size=PAGE_SIZE, num_pages=256)

    def _run(self, prompt: Sequence[int], n: int, stop: Iterable[int] = (),
             visible: Optional[Visibility] = None, logprob_of: Optional[Sequence[int]] = None):
        """Greedy-decodes up to `n` tokens after `prompt` (the prompt prefilled causally).

        `visible(i, j)` restricts attention of generated token i (absolute
        index) to slots j < i where it is true (itself always). With
        `logprob_of`, teacher-forces those tokens and returns their logprobs.
        """
        from engine_jax.batch import ForwardRequest, Logprobs, Sample

        engine, ps = self.engine, self.engine.page_size
        stop = set(stop)
        pages: list[int] = []
        step, length = list(prompt), 0
        out: list = []
        try:
            for k in range(n if logprob_of is None else len(logprob_of)):
                while len(pages) * ps < length + len(step):
                    pages.extend(engine.pool.alloc(1))
                positions = list(range(length, length + len(step)))
                length += len(step)
                mask = None
                if visible is not None and k > 0:
                    i = length - 1
                    mask = np.array([[j == i or visible(i, j) for j in range(length)]])
                request = Logprobs(index=len(step) - 1, token_ids=(logprob_of[k],)) if logprob_of is not None \
                    else Sample(index=len(step) - 1)
                req = ForwardRequest(tokens=step, positions=positions, pages=list(pages),
                                     last_page_len=length - (len(pages) - 1) * ps, mask=mask, outputs=[request])
                result = engine.step([req])[0][0]
                if logprob_of is not None:
                    out.append(float(result[0]))
                    step = [logprob_of[k]]
                    continue
                token = int(result)
                out.append(token)
                if token in stop:
                    break
                step = [token]
        finally:
            engine.pool.free(pages)
        return out

    def greedy(self, prompt: Sequence[int], n: int, stop: Iterable[int] = ()) -> list[int]:
        """Greedy tokens after `prompt`, ending with the stop token when one is drawn."""
        return self._run(prompt, n, stop)

    def greedy_visible(self, prompt: Sequence[int], n: int, visible: Visibility) -> list[int]:
        return self._run(prompt, n, visible=visible)

    def logprobs(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        """Natural-log probability of each token of `continuation` given what precedes it."""
        return self._run(prompt, 0, logprob_of=list(continuation))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def top(self, prompt: Sequence[int], k: int) -> list[int]:
        """The k most likely next tokens after `prompt` (prefilled causally), most likely first."""
        from engine_jax.batch import Distribution, ForwardRequest

        engine, ps = self.engine, self.engine.page_size
        pages = engine.pool.alloc(-(-len(prompt) // ps))
        try:
            req = ForwardRequest(tokens=list(prompt), positions=list(range(len(prompt))), pages=list(pages),
                                 last_page_len=len(prompt) - (len(pages) - 1) * ps, mask=None,
                                 outputs=[Distribution(index=len(prompt) - 1, k=k)])
            ids, _ = engine.step([req])[0][0]
        finally:
            engine.pool.free(pages)
        return [int(t) for t in ids]
