"""WIT values <-> the serving core's and the engine's: error records, BRLE masks, forward requests, outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from wasmtime.component import Record

from engine_jax.batch import Distribution, Logprobs, Sample, SampledToken
from pie_runtime.errors import PieError

if TYPE_CHECKING:
    from pie_runtime.host.registry import ServedModel


def error_record(code: str, message: str) -> Record:
    """The WIT `error` record a function returning `result` fails with."""
    rec = Record()
    setattr(rec, "code", code)
    setattr(rec, "message", message)
    return rec


def decode_brle(runs: Sequence[int], length: int, what: str) -> np.ndarray:
    """A WIT BRLE (alternating runs, starting with `false`) as a bool array of `length`."""
    r = np.asarray(runs, dtype=np.int64)
    total = int(r.sum()) if r.size else 0
    if total != length:
        raise PieError.invalid(f"{what}: BRLE runs sum to {total}, expected {length}")
    values = np.zeros(r.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, r)


def encode_brle(mask: Sequence[bool] | np.ndarray) -> list[int]:
    """The inverse of `decode_brle` (used by tests and tools)."""
    runs, current, count = [], False, 0
    for bit in np.asarray(mask, dtype=bool).tolist():
        if bit == current:
            count += 1
        else:
            runs.append(count)
            current, count = bit, 1
    runs.append(count)
    return runs


def sample_request(spec: Any, vocab_size: int) -> Sample:
    allowed = spec.allowed
    allowed_mask = None if allowed is None else decode_brle(allowed, vocab_size, "sample.allowed")
    return Sample(
        index=spec.index,
        temperature=float(spec.temperature),
        top_k=getattr(spec, "top-k"),
        top_p=float(getattr(spec, "top-p")),
        min_p=float(getattr(spec, "min-p")),
        seed=spec.seed,
        allowed=allowed_mask,
        logprobs=spec.logprobs,
    )


def output_request(req: Any, vocab_size: int) -> Any:
    tag, spec = req.tag, req.payload
    if tag == "sample":
        return sample_request(spec, vocab_size)
    if tag == "distribution":
        return Distribution(index=spec.index, k=spec.k, temperature=float(spec.temperature))
    if tag == "logprobs":
        return Logprobs(index=spec.index, token_ids=tuple(spec.tokens))
    raise PieError.invalid(f"unknown output request {tag!r}")


def output_value(request: Any, result: Any) -> Any:
    """One core result as the WIT `output` variant (untagged in wasmtime-py: int / Record / tuple / list)."""
    if isinstance(request, Sample):
        if isinstance(result, SampledToken):
            rec = Record()
            for name, value in (("token", result.token), ("logprob", result.logprob),
                                ("top-tokens", result.top_tokens), ("top-logprobs", result.top_logprobs)):
                setattr(rec, name, value)
            return rec
        return int(result)
    if isinstance(request, Distribution):
        ids, probs = result
        return ([int(i) for i in ids], [float(p) for p in probs])
    return [float(p) for p in result]


def forward_args(served: ServedModel, request: Any) -> tuple[Any, ...]:
    """A WIT forward-request as `Queue.forward` arguments (tokens, positions,
    pages, last-page-len, mask, outputs); token ids are checked by the
    engine's validation in the queue."""
    tokens = request.tokens
    pages = request.pages
    last_page_len = getattr(request, "last-page-len")
    mask = None
    if request.mask is not None:
        if len(request.mask) != len(tokens):
            raise PieError.invalid(f"mask has {len(request.mask)} rows for {len(tokens)} tokens")
        if not pages:
            raise PieError.invalid("a mask needs at least one page")
        seq_len = (len(pages) - 1) * served.page_size + last_page_len
        if len(tokens):
            mask = np.stack([decode_brle(row, seq_len, f"mask row {i}") for i, row in enumerate(request.mask)])
        else:
            mask = np.zeros((0, seq_len), dtype=bool)
    outputs = [output_request(o, served.vocab_size) for o in request.outputs]
    return tokens, request.positions, pages, last_page_len, mask, outputs


def outputs_converter(outputs: Sequence[Any]) -> Callable[[Sequence[Any]], list[Any]]:
    """Turns the core's results for `outputs` into the WIT `list<output>` (a forward future's value)."""

    def convert(results: Sequence[Any]) -> list[Any]:
        if len(results) != len(outputs):
            raise PieError.internal(f"engine returned {len(results)} outputs for {len(outputs)} requests")
        return [output_value(req, res) for req, res in zip(outputs, results)]

    return convert

