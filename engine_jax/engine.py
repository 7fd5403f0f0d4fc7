"""The engine: one batched, jitted forward step over many requests, plus device ops on the KV pool.

``Engine.step`` validates each ``ForwardRequest``, flattens the batch into
bucketed arrays (powers of two for tokens, requests, pages per request and
output rows; for decode batches past 8 pages, also the quarter steps
between powers of two), so a few compilations serve every mix, runs one
jitted step with the KV pool donated, and turns the device outputs back into
per-request results. See ``engine_jax.batch`` for slot/page/position semantics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from engine_jax import quant
from engine_jax.batch import (
    Distribution,
    EngineInputError,
    ForwardRequest,
    MAX_SAMPLE_LOGPROBS,
    Logprobs,
    OutputResult,
    Sample,
    SampledToken,
)
from engine_jax.config import ModelConfig
from engine_jax.families import family_of
from engine_jax.kv_cache import (
    HostPages,
    KVCache,
    PagePool,
    clear_pages,
    create_kv_cache,
    gather_pages,
    page_ids,
    pages_for_budget,
    write_rows,
)
from engine_jax.map_budget import MapBudget
from engine_jax.model import Params, TokenBatch
from engine_jax.paged_attention import AttentionFn, resolve_attention
from engine_jax.paged_attention.reference import use_by_request
from engine_jax.sampling import row_keys, sample_tokens, sampled_logprobs, token_logprobs, top_k_distribution
from engine_jax.sharding import MODEL_AXES, TensorParallel

_CPU_KV_BUDGET = 512 * 1024 * 1024
_ACCELERATOR_KV_FRACTION = 0.8
_MAX_SEED = 2**64


class LoadedModelLike(Protocol):
    name: str
    config: ModelConfig
    params: Params
    tokenizer: Any


def enable_compilation_cache() -> None:
    """Points JAX's persistent compilation cache at ``$PIE_HOME/jax`` (default ``~/.cache/pie/jax``) unless set."""
    if jax.config.jax_compilation_cache_dir:
        return
    home = Path(os.environ.get("PIE_HOME") or Path.home() / ".cache" / "pie")
    path = home / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable home only costs recompilation
    jax.config.update("jax_compilation_cache_dir", str(path))


def _bucket(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def _bucket_pages(n: int, decode: bool = True) -> int:
    """Page-table width: powers of two; for a decode batch past 8 pages also the quarter steps
    between them (10, 12, 14, 16, 20, 24, 28, 32, ...).

    Decode attention (the per-token path) gathers and scores every slot of
    the bucket, so a power of two would waste up to half the work (9 used
    pages attended as 16); quarter steps cap the waste below a fifth for a
    few more compiled shapes (at 16 sequences of 9-10 pages: 4.7% of the
    whole step against half steps, benchmarks/RESULTS.md, issue 17). Batches
    that bring several tokens per request (prefill) take the by-request path,
    which walks K/V in whole blocks of 256 slots and stops at each request's
    end: a finer width would only add shapes to compile there.
    """
    p = _bucket(n)
    if decode and p > 8:
        return next(w for w in (5 * p // 8, 3 * p // 4, 7 * p // 8, p) if w >= n)
    return p


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class OutputBatch:
    """Per-output-row parameters (length O, bucketed); unused fields hold neutral values."""

    temperature: jax.Array  # f32[O]
    top_k: jax.Array  # i32[O]
    top_p: jax.Array  # f32[O]
    min_p: jax.Array  # f32[O]
    seed_data: jax.Array  # u32[O, 2]
    has_seed: jax.Array  # bool[O]
    allowed: jax.Array | None  # bool[O, V]
    dist_temperature: jax.Array  # f32[O]
    logprob_ids: jax.Array | None  # i32[O, L]
    stream_key: jax.Array  # u32[2]
    step: jax.Array  # i32 scalar


def _step_impl(params, cache, batch, outputs, inv_freq, *, config, attention, tensor_parallel, sample_mode,
               sort_width, dist_k, sample_top=None):
    forward = family_of(config).forward
    cache, logits = forward(params, cache, batch, inv_freq, config=config, attention=attention)
    if tensor_parallel is not None:  # whole vocabulary rows before sampling
        logits = tensor_parallel.gather_logits(logits)
    results = {}
    if sample_mode:
        stochastic = sample_mode == 2
        keys = row_keys(outputs.seed_data, outputs.has_seed, outputs.stream_key, outputs.step) if stochastic else None
        results["tokens"] = sample_tokens(
            logits, outputs.temperature, outputs.top_k, outputs.top_p, outputs.min_p, keys,
            outputs.allowed, stochastic=stochastic, sort_width=sort_width,
        )
        if sample_top is not None:  # some row wants its draw's log-probabilities
            results.update(sampled_logprobs(logits, results["tokens"], sample_top))
    if dist_k:
        results["dist_ids"], results["dist_probs"] = top_k_distribution(logits, outputs.dist_temperature, dist_k)
    if outputs.logprob_ids is not None:
        results["logprobs"] = token_logprobs(logits, outputs.logprob_ids)
    return cache, results


# Module-level jits: engines of the same model config share compiled executables.
_step_jit = jax.jit(
    _step_impl,
    static_argnames=("config", "attention", "tensor_parallel", "sample_mode", "sort_width", "dist_k", "sample_top"),
    donate_argnums=(1,),
)


def _copy_slots(cache, src_page, src_offset, dst_page, dst_offset, count):
    page_size = cache.page_size
    i = jnp.arange(page_size, dtype=jnp.int32)
    src = jnp.minimum(src_offset + i, page_size - 1)
    # Offsets past `count` point outside the page, so the scatter drops them.
    dst = jnp.where(i < count, dst_offset + i, page_size)

    def copy(a):
        return a.at[dst_page, dst].set(a[src_page, src], mode="drop")

    return KVCache(
        k=tuple(copy(a) for a in cache.k),
        v=tuple(copy(a) for a in cache.v),
        slot_valid=copy(cache.slot_valid),
        positions=None if cache.positions is None else copy(cache.positions),
    )


def _set_valid(slot_valid, page, offset, count, valid):
    i = jnp.arange(slot_valid.shape[1], dtype=jnp.int32)
    selected = (i >= offset) & (i < offset + count)
    row = jnp.where(selected, valid, slot_valid[page])
    return slot_valid.at[page].set(row)


_copy_jit = jax.jit(_copy_slots, donate_argnums=(0,))
_set_jit = jax.jit(_set_valid, donate_argnums=(0,))

PoolOp = Callable[[KVCache, dict[str, Any], Any], tuple[KVCache, Any]]
# The KV-pool ops besides the step: (cache, host arrays, TensorParallel or None) -> (new cache,
# device result or None). Every op that touches the pool goes through ``Engine._device_op`` by
# name, so a multi-host leader replays it on its followers (host arrays in, so they can be sent),
# and ``engine_jax.replicas.ReplicatedEngine`` routes the public method to the replica that holds
# the pages. A result must be whole on every device (a multi-host leader reads its own copy). A
# new pool op is a row here plus an Engine method that checks its arguments and calls
# ``_device_op`` (and a ReplicatedEngine method).
POOL_OPS: dict[str, PoolOp] = {
    "clear": lambda cache, a, tp: (clear_pages(cache, a["pages"]), None),
    "copy": lambda cache, a, tp: (_copy_jit(cache, *(a[k] for k in ("src_page", "src_offset", "dst_page",
                                                                      "dst_offset", "count"))), None),
    "set": lambda cache, a, tp: (dataclasses.replace(cache, slot_valid=_set_jit(
        cache.slot_valid, *(a[k] for k in ("page", "offset", "count", "valid")))), None),
    "save": lambda cache, a, tp: (cache, gather_pages(cache, a["pages"], tp.replicated if tp else None)),
    "load": lambda cache, a, tp: (write_rows(cache, a["pages"], a), None),
}


class Engine:
    """Runs batched forward steps of one model over a paged KV pool.

    ``model`` is any object with ``name``, ``config`` (a family's config:
    ModelConfig, Gemma3Config), ``params`` (that family's params) and
    ``tokenizer``. The pool holds
    ``num_pages`` pages of ``page_size`` slots; by default as many as fit in
    ``kv_memory_bytes`` (default: 80% of free accelerator memory, 512 MiB on
    CPU). ``attention`` is "reference", "kernel", "interpret", a callable, or
    None for the platform default.

    With a ``mesh`` (``engine_jax.sharding.make_mesh``) the model runs tensor
    parallel over its devices: ``model.params`` must be laid out for it
    (``load_model(..., mesh=mesh)``); the KV budget is per device.
    Page ids, validation and results are those of one device.
    """

    def __init__(
        self,
        model: LoadedModelLike,
        page_size: int = 16,
        num_pages: int | None = None,
        kv_memory_bytes: int | None = None,
        attention: str | AttentionFn | None = None,
        seed: int = 0,
        mesh: Mesh | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        enable_compilation_cache()
        self.model = model
        self.name: str = model.name
        self.config: ModelConfig = model.config
        self.tensor_parallel = TensorParallel(mesh, model.config) if mesh is not None else None
        tp = self.tensor_parallel
        layout = tp.layout_config if tp else self.config  # KV heads as laid out on the devices
        params = tp.place_params(model.params) if tp else model.params
        self.params: Params = _with_cpu_lm_head(params, tp)
        self.tokenizer = model.tokenizer
        self.page_size = page_size
        self.dtype = self.params.embed.dtype
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        if num_pages is None:
            budget = kv_memory_bytes if kv_memory_bytes is not None else _default_kv_budget(devices[0])
            # Each device holds its share of the KV heads.
            num_pages = pages_for_budget(layout, page_size, self.dtype, budget * len(devices))
            if jax.process_count() > 1:  # every process must build the same pool: the smallest
                num_pages = int(multihost_utils.process_allgather(np.int64(num_pages)).min())
        self.num_pages = int(num_pages)
        self.pool = PagePool(self.num_pages)
        self.family = family_of(self.config)
        self.cache: KVCache = create_kv_cache(layout, self.num_pages, page_size, self.dtype,
                                              with_positions=self.family.slot_positions,
                                              kv_sharding=tp.kv_sharding if tp else None,
                                              slot_sharding=tp.replicated if tp else None)
        self.attention_fn = resolve_attention(attention)
        self.platform: str = devices[0].platform  # "cpu", "gpu", "tpu"
        self._inv_freq = jax.device_put(self.family.rope_inv_freq(self.config), tp.replicated if tp else devices[0])
        self._stream_key = np.asarray(jax.random.key_data(jax.random.key(seed)), dtype=np.uint32)
        self._step_count = 0
        self._step = partial(_step_jit, config=layout, attention=tp.attention(self.attention_fn) if tp else
                             self.attention_fn, tensor_parallel=tp)
        # Compiled step executables hold memory mappings; see engine_jax.map_budget.
        self.map_budget = MapBudget()
        self._step_executables = _step_jit._cache_size()
        # A multi-host leader (engine_jax.distributed.Leader) sends every device op to the followers.
        self.leader: Any = None

    # ------------------------------------------------------------------ validation

    def validate(self, req: ForwardRequest, *, check_pages: bool = True) -> None:
        """Raises EngineInputError naming the offending field if ``req`` cannot run.

        ``check_pages=False`` skips the checks of the page ids themselves (in
        range, allocated, distinct) for a caller that checks its own ids and
        maps them to physical pages later (the serving core)."""
        c, ps = self.config, self.page_size
        n = len(req.tokens)
        if n == 0:
            raise EngineInputError("tokens is empty: a forward request needs at least one new token")
        tokens = _int_list(req.tokens, "tokens")
        if min(tokens) < 0 or max(tokens) >= c.vocab_size:
            bad = next(t for t in tokens if not 0 <= t < c.vocab_size)
            raise EngineInputError(f"token id {bad} is outside the vocabulary (0..{c.vocab_size - 1})")
        if len(req.positions) != n:
            raise EngineInputError(f"len(positions)={len(req.positions)} != len(tokens)={n}")
        positions = _int_list(req.positions, "positions")
        if min(positions) < 0 or max(positions) >= c.max_position_embeddings:
            bad = next(p for p in positions if not 0 <= p < c.max_position_embeddings)
            raise EngineInputError(
                f"position {bad} is outside 0..{c.max_position_embeddings - 1} (max_position_embeddings)"
            )
        if len(req.pages) == 0:
            raise EngineInputError("pages is empty: the new tokens need at least one page")
        pages = _int_list(req.pages, "pages")
        for p in pages if check_pages else ():
            if not 0 <= p < self.num_pages:
                raise EngineInputError(f"page id {p} is out of range 0..{self.num_pages - 1}")
            if not self.pool.is_allocated(p):
                raise EngineInputError(f"page {p} is not allocated")
        if check_pages and len(set(pages)) != len(pages):
            raise EngineInputError(f"pages contains a page more than once: {list(pages)}")
        if not isinstance(req.last_page_len, (int, np.integer)) or not 1 <= req.last_page_len <= ps:
            raise EngineInputError(f"last_page_len={req.last_page_len!r} is not in 1..{ps} (page_size)")
        kv_len = req.sequence_length(ps)
        if n > kv_len:
            raise EngineInputError(f"{n} new tokens do not fit in a sequence of {kv_len} slots")
        if req.mask is not None:
            mask = np.asarray(req.mask)
            if mask.dtype != np.bool_:
                raise EngineInputError(f"mask must be boolean, got dtype {mask.dtype}")
            if mask.shape != (n, kv_len):
                raise EngineInputError(f"mask has shape {mask.shape}, expected {(n, kv_len)} (tokens x sequence slots)")
        for i, out in enumerate(req.outputs):
            self.validate_output(out, i, n)

    def validate_output(self, out: Any, i: int, n: int) -> None:
        """Checks output request number ``i`` of a request with ``n`` new tokens."""
        v = self.config.vocab_size
        where = f"outputs[{i}]"
        if not isinstance(out, (Sample, Distribution, Logprobs)):
            raise EngineInputError(f"{where} is a {type(out).__name__}, not Sample, Distribution or Logprobs")
        if not isinstance(out.index, (int, np.integer)) or not 0 <= out.index < n:
            raise EngineInputError(f"{where}.index={out.index!r} is out of range 0..{n - 1} (the new tokens)")
        if isinstance(out, Sample):
            if not (math.isfinite(out.temperature) and out.temperature >= 0):
                raise EngineInputError(f"{where}.temperature={out.temperature} must be finite and >= 0")
            if not 0 <= out.top_k <= v:
                raise EngineInputError(f"{where}.top_k={out.top_k} is out of range 0..{v}")
            if not 0 < out.top_p <= 1:
                raise EngineInputError(f"{where}.top_p={out.top_p} must be in (0, 1]")
            if not 0 <= out.min_p <= 1:
                raise EngineInputError(f"{where}.min_p={out.min_p} must be in [0, 1]")
            if out.seed is not None and not 0 <= out.seed < _MAX_SEED:
                raise EngineInputError(f"{where}.seed={out.seed} must be in 0..2**64-1")
            if out.logprobs is not None and not 0 <= out.logprobs <= min(MAX_SAMPLE_LOGPROBS, v):
                raise EngineInputError(
                    f"{where}.logprobs={out.logprobs} is out of range 0..{min(MAX_SAMPLE_LOGPROBS, v)}")
            if out.allowed is not None:
                allowed = np.asarray(out.allowed)
                if allowed.dtype != np.bool_ or allowed.shape != (v,):
                    raise EngineInputError(
                        f"{where}.allowed must be bool[{v}] (one per vocabulary token), got {allowed.dtype}{list(allowed.shape)}"
                    )
                if not allowed.any():
                    raise EngineInputError(f"{where}.allowed allows no token")
        elif isinstance(out, Distribution):
            if not 1 <= out.k <= v:
                raise EngineInputError(f"{where}.k={out.k} is out of range 1..{v}")
            if not (math.isfinite(out.temperature) and out.temperature > 0):
                raise EngineInputError(f"{where}.temperature={out.temperature} must be finite and > 0")
        else:
            ids = np.asarray(out.token_ids, dtype=np.int64).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= v):
                bad = int(ids[(ids < 0) | (ids >= v)][0])
                raise EngineInputError(f"{where}.token_ids contains {bad}, outside the vocabulary (0..{v - 1})")

    # ------------------------------------------------------------------ the step

    def step(self, requests: Sequence[ForwardRequest], *, validated: bool = False) -> list[list[OutputResult]]:
        """One batched forward over all ``requests``; results per request, in order.

        ``validated=True`` skips the per-request checks for a caller that ran
        ``validate`` on each request itself (the serving core does, at enqueue);
        conflicts between requests (two writing one slot) are still caught.
        """
        if not validated:
            for i, req in enumerate(requests):
                try:
                    self.validate(req)
                except EngineInputError as exc:
                    raise type(exc)(f"request {i}: {exc}") from None
        return self._run(requests)

    def _run(self, requests: Sequence[ForwardRequest]) -> list[list[OutputResult]]:
        """The step without validation (callers that build requests themselves, e.g. ``generate``)."""
        if not requests:
            return []
        return self.finish(self.launch(requests))

    def launch(self, requests: Sequence[ForwardRequest]) -> Any:
        """Dispatches the step of (validated) ``requests`` without waiting for the device;
        ``finish`` waits and returns the results (data-parallel replicas overlap their steps)."""
        self._flush_fresh_pages()
        batch, out_batch, static, plan = self._prepare(requests)
        arrays = {"batch": _fields(batch), "outputs": _fields(out_batch)}
        device_results = self._device_op("step", static, arrays)
        self._step_count += 1
        return plan, device_results, len(requests)

    def finish(self, launched: Any) -> list[list[OutputResult]]:
        plan, device_results, num_requests = launched
        host = self._fetch(device_results)
        if _step_jit._cache_size() != self._step_executables:  # a new shape compiled (or caches cleared)
            self.map_budget.check()
            self._step_executables = _step_jit._cache_size()
        return self._collect(plan, host, num_requests)

    # ------------------------------------------------------------------ device ops

    def _device_op(self, op: str, static: dict[str, Any], arrays: dict[str, Any]) -> Any:
        """Runs a device op; a multi-host leader first sends it to the followers."""
        if self.leader is not None:
            return self.leader.run(op, static, arrays, self.apply_device_op)
        return self.apply_device_op(op, static, arrays)

    def apply_device_op(self, op: str, static: dict[str, Any], arrays: dict[str, Any]) -> Any:
        """One device op on this process's share of the engine's state: ``"step"`` (returns the
        device results) or a pool op of ``POOL_OPS`` (returns its result, or the new KV cache).
        Host inputs only (numpy arrays in ``arrays``, plain values in ``static``): the followers
        of a multi-host engine (``engine_jax.distributed``) run what the leader sent them through here."""
        if op == "step":
            batch, outputs = TokenBatch(**arrays["batch"]), OutputBatch(**arrays["outputs"])
            self.cache, results = self._step(self.params, self.cache, batch, outputs, self._inv_freq, **static)
            return results
        if op not in POOL_OPS:
            raise ValueError(f"unknown device op {op!r}")
        self.cache, result = POOL_OPS[op](self.cache, arrays, self.tensor_parallel)
        return self.cache if result is None else result

    def _fetch(self, tree: Any) -> Any:
        """Device results (whole on every device) as host arrays."""
        if self.leader is not None:
            return self.leader.fetch(tree)
        return jax.device_get(tree)

    def step_hlo(self, requests: Sequence[ForwardRequest]) -> str:
        """The compiled HLO text of the step that would run ``requests`` (a diagnostic: look for cache copies)."""
        for req in requests:
            self.validate(req)
        batch, out_batch, static, _ = self._prepare(requests)
        lowered = self._step.func.lower(
            self.params, self.cache, batch, out_batch, self._inv_freq, **self._step.keywords, **static
        )
        return lowered.compile().as_text()

    def _prepare(self, requests: Sequence[ForwardRequest]):
        """Host arrays of one step: (TokenBatch, OutputBatch, static jit arguments, result plan)."""
        ps, c = self.page_size, self.config
        num_req = len(requests)
        q_lens = np.fromiter((len(r.tokens) for r in requests), np.int64, num_req)
        kv_lens = np.fromiter((r.sequence_length(ps) for r in requests), np.int64, num_req)
        max_pages = max(len(r.pages) for r in requests)
        total = int(q_lens.sum())
        T, R = _bucket(total), _bucket(num_req)
        P = _bucket_pages(max_pages, decode=not use_by_request(T, R))
        S = P * ps

        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        write_pages = np.full(T, self.num_pages, np.int32)  # out of range: dropped
        write_offsets = np.zeros(T, np.int32)
        q_slots = np.zeros(T, np.int32)
        page_table = np.zeros((R, P), np.int32)
        kv_lens_arr = np.zeros(R, np.int32)
        kv_lens_arr[:num_req] = kv_lens
        cu = np.full(R + 1, total, np.int32)
        cu[0] = 0
        cu[1:num_req + 1] = np.cumsum(q_lens)
        window = self.family.mask_window(c)
        need_mask = any(r.mask is not None for r in requests) or (window is not None and kv_lens.max() > window)
        mask = np.zeros((T, S), np.bool_) if need_mask else None
        cols = np.arange(S)

        starts = cu[:num_req]
        for r, req in enumerate(requests):
            n, kv, s = int(q_lens[r]), int(kv_lens[r]), int(starts[r])
            pages = np.asarray(req.pages, np.int32)
            slots = np.arange(kv - n, kv, dtype=np.int32)
            tokens[s:s + n] = req.tokens
            positions[s:s + n] = req.positions
            write_pages[s:s + n] = pages[slots // ps]
            write_offsets[s:s + n] = slots % ps
            q_slots[s:s + n] = slots
            page_table[r, :len(pages)] = pages
            if mask is not None:
                if req.mask is not None:
                    mask[s:s + n, :kv] = req.mask
                else:
                    mask[s:s + n] = cols[None, :] <= slots[:, None]
                if window is not None:
                    mask[s:s + n] &= cols[None, :] > slots[:, None] - window

        written = write_pages[:total].astype(np.int64) * ps + write_offsets[:total]
        if len(np.unique(written)) != total:
            raise EngineInputError(self._describe_write_conflict(written, q_lens))

        outputs, plan, static = self._prepare_outputs(requests, starts)
        batch = TokenBatch(
            tokens=tokens, positions=positions, write_pages=write_pages, write_offsets=write_offsets,
            page_table=page_table, kv_lens=kv_lens_arr, cu_q_lens=cu, q_slots=q_slots,
            custom_mask=mask, output_rows=outputs.pop("rows"),
        )
        return batch, OutputBatch(**outputs), static, plan

    def _describe_write_conflict(self, written: np.ndarray, q_lens: np.ndarray) -> str:
        owner = np.repeat(np.arange(len(q_lens)), q_lens)
        order = np.argsort(written, kind="stable")
        dup = np.nonzero(written[order][1:] == written[order][:-1])[0][0]
        a, b = owner[order[dup]], owner[order[dup + 1]]
        slot = int(written[order[dup]])
        return (
            f"requests {a} and {b} both write slot {slot % self.page_size} of page {slot // self.page_size} "
            "in the same step"
        )

    def _prepare_outputs(self, requests, starts):
        """Host arrays for the output rows, a plan to unpack results, and the static step arguments."""
        v = self.config.vocab_size
        specs = [(int(starts[r]) + o.index, r, o) for r, req in enumerate(requests) for o in req.outputs]
        num_rows = len(specs)
        O = _bucket(num_rows) if num_rows else 0
        rows = np.zeros(O, np.int32)
        temperature = np.zeros(O, np.float32)
        top_k = np.zeros(O, np.int32)
        top_p = np.ones(O, np.float32)
        min_p = np.zeros(O, np.float32)
        seed_data = np.zeros((O, 2), np.uint32)
        has_seed = np.zeros(O, np.bool_)
        dist_temperature = np.ones(O, np.float32)
        allowed = None
        sample_mode, sort_width, dist_k, logprob_width = 0, 0, 0, 0
        max_top_k, uses_top_p = 0, False
        sample_top = None  # the alternatives' width when a sample row wants log-probabilities
        for i, (row, _, o) in enumerate(specs):
            rows[i] = row
            if isinstance(o, Sample):
                sample_mode = max(sample_mode, 1)
                temperature[i] = o.temperature
                if o.temperature > 0:
                    sample_mode = 2
                    top_k[i], top_p[i], min_p[i] = o.top_k, o.top_p, o.min_p
                    max_top_k = max(max_top_k, o.top_k)
                    uses_top_p |= o.top_p < 1
                if o.seed is not None:
                    has_seed[i] = True
                    seed_data[i] = (o.seed >> 32) & 0xFFFFFFFF, o.seed & 0xFFFFFFFF
                if o.allowed is not None:
                    if allowed is None:
                        allowed = np.ones((O, v), np.bool_)
                    allowed[i] = o.allowed
                if o.logprobs is not None:
                    sample_top = max(sample_top or 0, o.logprobs)
            elif isinstance(o, Distribution):
                dist_k = max(dist_k, o.k)
                dist_temperature[i] = o.temperature
            else:
                logprob_width = max(logprob_width, len(o.token_ids))
        if uses_top_p:
            sort_width = v
        elif max_top_k:
            sort_width = min(_bucket(max_top_k), v)
        logprob_ids = None
        if logprob_width:
            logprob_ids = np.zeros((O, _bucket(logprob_width)), np.int32)
            for i, (_, _, o) in enumerate(specs):
                if isinstance(o, Logprobs):
                    logprob_ids[i, :len(o.token_ids)] = o.token_ids
        arrays = dict(
            rows=rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            seed_data=seed_data, has_seed=has_seed, allowed=allowed, dist_temperature=dist_temperature,
            logprob_ids=logprob_ids, stream_key=self._stream_key, step=np.int32(self._step_count),
        )
        static = dict(
            sample_mode=sample_mode, sort_width=sort_width,
            dist_k=min(_bucket(dist_k), v) if dist_k else 0,
        )
        if sample_top is not None:  # 0 stays 0: the drawn token's own log-probability only
            static["sample_top"] = min(_bucket(sample_top), v) if sample_top else 0
        plan = [(r, o) for _, r, o in specs]
        return arrays, plan, static

    def _collect(self, plan, host, num_requests: int) -> list[list[OutputResult]]:
        results: list[list[OutputResult]] = [[] for _ in range(num_requests)]
        tokens = host["tokens"].tolist() if "tokens" in host else None
        for i, (r, o) in enumerate(plan):
            if isinstance(o, Sample):
                if o.logprobs is None:
                    results[r].append(tokens[i])
                else:
                    results[r].append(SampledToken(
                        tokens[i], float(host["sampled_logprob"][i]),
                        host["top_ids"][i, :o.logprobs].tolist(), host["top_logprobs"][i, :o.logprobs].tolist()))
            elif isinstance(o, Distribution):
                results[r].append((host["dist_ids"][i, :o.k].tolist(), host["dist_probs"][i, :o.k].tolist()))
            else:
                results[r].append(host["logprobs"][i, :len(o.token_ids)].tolist())
        return results

    # ------------------------------------------------------------------ device ops on the pool

    def _flush_fresh_pages(self) -> None:
        """Clears the pages allocated since the last device op (K, V and valid bits: see kv_cache)."""
        fresh = self.pool.take_fresh()
        if fresh:
            ids = np.full(_bucket(len(fresh)), self.num_pages, np.int32)
            ids[:len(fresh)] = fresh
            self._device_op("clear", {}, {"pages": ids})

    def _check_range(self, page: int, offset: int, count: int, what: str) -> None:
        if not 0 <= page < self.num_pages:
            raise EngineInputError(f"{what} page id {page} is out of range 0..{self.num_pages - 1}")
        if not self.pool.is_allocated(page):
            raise EngineInputError(f"{what} page {page} is not allocated")
        if offset < 0 or count < 0 or offset + count > self.page_size:
            raise EngineInputError(
                f"{what} slots {offset}..{offset + count - 1} do not fit in a page of {self.page_size} slots"
            )

    def copy_slots(self, src_page: int, src_offset: int, dst_page: int, dst_offset: int, count: int) -> None:
        """Copies ``count`` slots (K, V in every layer, and the valid bits) between pages."""
        self._check_range(src_page, src_offset, count, "source")
        self._check_range(dst_page, dst_offset, count, "destination")
        if count == 0:
            return
        self._flush_fresh_pages()
        self._device_op("copy", {}, {"src_page": np.int32(src_page), "src_offset": np.int32(src_offset),
                                     "dst_page": np.int32(dst_page), "dst_offset": np.int32(dst_offset),
                                     "count": np.int32(count)})

    def copy_page(self, src: int, dst: int) -> None:
        """Copies a whole page (all slots of every layer, and the valid bits)."""
        self.copy_slots(src, 0, dst, 0, self.page_size)

    def set_valid(self, page: int, offset: int, count: int, valid: bool) -> None:
        """Marks slots attendable (True) or excluded from all attention (False)."""
        self._check_range(page, offset, count, "mask")
        if count == 0:
            return
        self._flush_fresh_pages()
        self._device_op("set", {}, {"page": np.int32(page), "offset": np.int32(offset), "count": np.int32(count),
                                    "valid": np.bool_(valid)})

    def save_pages(self, pages: Sequence[int]) -> HostPages:
        """A host copy of whole pages (K, V in every layer, valid bits), e.g. before they are freed."""
        for page in pages:
            self._check_range(page, 0, 0, "saved")
        self._flush_fresh_pages()
        rows = self._device_op("save", {}, {"pages": page_ids(pages, 0)})
        return HostPages.from_rows(self._fetch(rows), len(pages))

    def load_pages(self, pages: Sequence[int], saved: HostPages) -> None:
        """Overwrites allocated ``pages`` with what ``save_pages`` returned (row i -> pages[i])."""
        for page in pages:
            self._check_range(page, 0, 0, "loaded")
        if len(pages) != len(saved):
            raise EngineInputError(f"{len(pages)} pages for {len(saved)} saved pages")
        self._flush_fresh_pages()
        ids = page_ids(pages, self.num_pages)
        self._device_op("load", {}, {"pages": ids, **saved.rows(len(ids))})

    def slot_valid(self) -> np.ndarray:
        """A host copy of the valid bits ``[num_pages, page_size]`` (for inspection and tests)."""
        self._flush_fresh_pages()
        return np.asarray(self._fetch(self.cache.slot_valid))


def _with_cpu_lm_head(params: Params, tp: TensorParallel | None) -> Params:
    """On CPU, gives tied models an explicit [hidden, vocab] head: XLA:CPU multiplies by a
    transposed embedding ~1.5x slower than by a contiguous copy (accelerators need no copy)."""
    if params.lm_head is not None or jax.default_backend() != "cpu":
        return params
    head = quant.transposed_copy(params.embed)
    if tp is not None:
        head = jax.device_put(head, tp.weight_sharding(head, MODEL_AXES["lm_head"]))
    return dataclasses.replace(params, lm_head=head)


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict (shallow: the arrays are not copied)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _int_list(values: Sequence[int], field: str) -> Sequence[int]:
    """``values`` as plain Python ints (as given when they already are: the common,
    per-token case costs no conversion), else through numpy with its checks."""
    if isinstance(values, (list, tuple, range)) and all(type(v) is int for v in values):
        return values
    return _int_array(values, field).tolist()


def _int_array(values: Sequence[int], field: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise EngineInputError(f"{field} must be a list of integers ({exc})") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise EngineInputError(f"{field} must be a flat list of integers, got dtype {array.dtype} shape {array.shape}")
    return array


def _default_kv_budget(device: Any) -> int:
    if device.platform == "cpu":
        return _CPU_KV_BUDGET
    try:
        stats = device.memory_stats() or {}
        free = stats["bytes_limit"] - stats["bytes_in_use"]
    except (KeyError, TypeError, AttributeError):
        return _CPU_KV_BUDGET
    return int(free * _ACCELERATOR_KV_FRACTION)
