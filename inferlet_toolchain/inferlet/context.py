"""Context: one token sequence, its KV pages and its command queue.

The state a context keeps, and the invariants it relies on:

- `tokens`/`positions`: the tokens whose KV is in `pages`, in slot order,
  with their RoPE positions (`kv_len` of them).
- `pending`: tokens given (`fill`) but not yet run through the model. After
  `flush()` and after `generate()` one token stays pending: the next step's
  forward needs a token to produce a distribution from.
- Page ids are per instance, so forks hold the *same* ids for the pages they
  share; a module-wide refcount decides when a page is really freed. A
  context never writes (forward, mask) into a page whose refcount is above
  one: full shared pages are only read (new tokens go into new pages), and a
  shared partial page is copied into a fresh page first.
- Commands on different queues are unordered, so `fork()` first waits for
  the parent's queue to drain: the child then only reads pages whose
  contents have taken effect.

Guest-only: imports the bindings.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Generator, Iterable, Optional, Sequence, Union

from . import raw
from .drafter import Drafter
from .errors import InferletError
from .grammar import Grammar, Matcher
from .loop import wait
from .model import Message, Model, call, get_model, to_chat_message
from .sampling import Sampler, Stop, TokenLogprobs

# A step of work: yields host futures, receives their results (the driver
# waits and drops each), returns a value.
Steps = Generator[Any, Any, Any]

_EXPORT_META_PREFIX = "pie.context/"


class _PageRefs:
    """How many contexts of this instance hold each page id, and which pages
    other instances may read (exported or imported: never written in place)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.foreign: set[int] = set()

    def retain(self, pages: Iterable[int], foreign: bool = False) -> None:
        for page in pages:
            self.counts[page] = self.counts.get(page, 0) + 1
            if foreign:
                self.foreign.add(page)

    def release(self, pages: Iterable[int]) -> list[int]:
        """Drops one reference to each page; returns the pages nobody holds now."""
        freed = []
        for page in pages:
            left = self.counts.get(page, 0) - 1
            if left <= 0:
                self.counts.pop(page, None)
                self.foreign.discard(page)
                freed.append(page)
            else:
                self.counts[page] = left
        return freed

    def mark_foreign(self, pages: Iterable[int]) -> None:
        self.foreign.update(pages)

    def shared(self, page: int) -> bool:
        return self.counts.get(page, 0) > 1 or page in self.foreign


_refs = _PageRefs()


class _QueuedRun:
    """A decode run on the queue: its future, its draws, and where the
    placeholders of its drawn tokens start in `Context.tokens`."""

    __slots__ = ("future", "length", "first_draw_slot")

    def __init__(self, future: Any, length: int, first_draw_slot: int) -> None:
        self.future = future
        self.length = length
        self.first_draw_slot = first_draw_slot


def _forward(queue: "raw.Queue", request: "raw.ForwardRequest",
             options: Optional["raw.ForwardOptions"] = None) -> Any:
    """Enqueues a pass (or a decode run, with `options.draws`); returns its future."""
    if options is None:
        options = raw.ForwardOptions(feed_previous=False, draws=[])
    return call(queue.forward, request, options)


def _drop(handle: Any) -> None:
    """Releases a host resource now instead of whenever the GC gets to it."""
    exit_ = getattr(handle, "__exit__", None)
    if exit_ is not None:
        exit_(None, None, None)


def _get(future: Any) -> Any:
    try:
        return call(future.get)
    finally:
        _drop(future)


def _unpack_draws(outputs: Sequence["raw.Output"]) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
    """The tokens of sample outputs, and their log-probabilities (None where not asked for)."""
    tokens: list[int] = []
    infos: list[Optional[TokenLogprobs]] = []
    for out in outputs:
        value = out.value
        if isinstance(value, int):
            tokens.append(value)
            infos.append(None)
        else:  # a sampled-token record
            tokens.append(value.token)
            infos.append(TokenLogprobs(value.token, value.logprob, tuple(zip(value.top_tokens, value.top_logprobs))))
    return tokens, infos


def _sample_spec(sampler: Sampler, index: int, step: int) -> "raw.SampleSpec":
    """The contract's spec to draw token number `step` at new-token `index`."""
    return raw.SampleSpec(**sampler.spec_fields(index, step))


def _sample_request(sampler: Sampler, index: int, step: int) -> "raw.OutputRequest":
    return raw.OutputRequestSample(_sample_spec(sampler, index, step))


def _drive(steps: Steps) -> Any:
    """Runs a step generator synchronously, blocking on each host future."""
    try:
        item = next(steps)
        while True:
            try:
                result = _get(item)
            except BaseException:
                steps.close()  # its cleanup (queued passes) runs now
                raise
            item = steps.send(result)
    except StopIteration as done:
        return done.value


async def _drive_async(steps: Steps) -> Any:
    """Runs a step generator on the event loop: other tasks run while it waits."""
    try:
        item = next(steps)
        while True:
            try:
                try:
                    result = await wait(item)
                except raw.Err as err:
                    raise InferletError.from_wit(err.value) from None
                finally:
                    _drop(item)
            except BaseException:
                steps.close()  # its cleanup (queued passes) runs now
                raise
            item = steps.send(result)
    except StopIteration as done:
        return done.value


class Context:
    """A token sequence being built and generated on one model.

    >>> ctx = Context(get_model())
    >>> ctx.fill("The capital of France is")
    >>> ctx.generate(Sampler.greedy(), Stop(max_tokens=16))
    """

    def __init__(self, model: Optional[Model] = None, *, priority: int = 0,
                 queue: Optional["raw.Queue"] = None) -> None:
        self.model = model if model is not None else get_model()
        self.queue = queue if queue is not None else self.model.create_queue(priority)
        self.page_size: int = self.model.page_size
        self.pages: list[int] = []
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.pending: list[int] = []
        self.next_position = 0
        # Tokens drawn by the last generate() (without a final EOS) and why it stopped.
        self.generated: list[int] = []
        # With Sampler(logprobs=n): one TokenLogprobs per generated token, appended as each is
        # drawn (an on_token callback can read the newest); None otherwise.
        self.logprobs: Optional[list[TokenLogprobs]] = None
        self.stop_reason: Optional[str] = None
        self._step = 0
        self._chat: list[raw.ChatMessage] = []
        self._chat_text: Optional[str] = None
        self._released = False

    # Introspection -------------------------------------------------------
    @property
    def kv_len(self) -> int:
        """Slots holding KV (= tokens already run through the model)."""
        return len(self.tokens)

    @property
    def last_page_len(self) -> int:
        if not self.pages:
            return 0
        return self.kv_len - (len(self.pages) - 1) * self.page_size

    @property
    def text(self) -> str:
        """The whole sequence (KV and pending) as text."""
        return self.model.tokenizer.decode(self.tokens + self.pending)

    def _check_alive(self) -> None:
        if self._released:
            raise RuntimeError("this context was released")

    # Filling ---------------------------------------------------------------
    def fill(self, text: str) -> None:
        """Appends `text` (tokenized by the model's tokenizer) to the pending tokens."""
        self.fill_tokens(self.model.tokenizer.encode(text))

    def fill_tokens(self, tokens: Sequence[int]) -> None:
        """Appends token ids to the pending tokens (BOS first on an empty context)."""
        self._check_alive()
        vocab = self.model.info.vocab_size
        for token in tokens:
            if not (isinstance(token, int) and 0 <= token < vocab):
                raise ValueError(f"token {token!r} is not an id in this model's vocabulary (0..{vocab - 1})")
        tokens = list(tokens)
        bos = self.model.info.bos_token
        if bos is not None and not self.tokens and not self.pending and tokens and tokens[0] != bos:
            tokens.insert(0, bos)
        self.pending.extend(tokens)

    def fill_chat(self, messages: Iterable[Message], add_generation_prompt: bool = True) -> None:
        """Appends chat turns, rendered by the model's chat template.

        The whole conversation is re-rendered and only the new part is
        filled, so call it once per turn: `generate()` adds the assistant's
        reply to the conversation by itself.
        """
        self._chat.extend(to_chat_message(m) for m in messages)
        rendered = self.model.apply_chat_template(self._chat, add_generation_prompt)
        before = self._chat_text or ""
        if not rendered.startswith(before):
            raise InferletError(
                "unsupported",
                "the chat template renders earlier turns differently once new ones are added; "
                "fill the rendered text yourself with fill()",
            )
        self.fill(rendered[len(before):])
        self._chat_text = rendered

    # Forward passes ------------------------------------------------------
    def _own_page(self, index: int) -> None:
        """Makes `pages[index]` private (copying it if shared) before a write."""
        page = self.pages[index]
        if not _refs.shared(page):
            return
        used = min(self.page_size, self.kv_len - index * self.page_size)
        fresh = self._allocate(1)[0]
        call(self.queue.copy_slots, page, 0, fresh, 0, used)
        self.pages[index] = fresh
        self._release_pages([page])

    def _allocate(self, count: int) -> list[int]:
        pages = list(call(self.queue.allocate_pages, count))
        _refs.retain(pages)
        return pages

    def _release_pages(self, pages: list[int]) -> None:
        freed = _refs.release(pages)
        if freed:
            call(self.queue.free_pages, freed)

    def _request(self, tokens: list[int], outputs: list[Any], positions: Optional[Sequence[int]],
                 mask: Optional[Sequence[Sequence[int]]]) -> "raw.ForwardRequest":
        """Makes room for `tokens`, records them as in KV, and builds the request."""
        self._check_alive()
        if positions is None:
            positions = list(range(self.next_position, self.next_position + len(tokens)))
        elif len(positions) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(positions)} positions")
        if self.pages and self.last_page_len < self.page_size:
            # The new tokens' KV lands in the last page: it must be ours alone.
            self._own_page(len(self.pages) - 1)
        needed = -(-(self.kv_len + len(tokens)) // self.page_size)
        if needed > len(self.pages):
            self.pages.extend(self._allocate(needed - len(self.pages)))
        self.tokens.extend(tokens)
        self.positions.extend(positions)
        if positions:
            self.next_position = max(self.next_position, max(positions) + 1)
        return raw.ForwardRequest(
            tokens=list(tokens), positions=list(positions), pages=list(self.pages),
            last_page_len=self.last_page_len,
            mask=None if mask is None else [list(m) for m in mask], outputs=outputs,
        )

    def _forward_steps(self, outputs: Sequence[Any], positions: Optional[Sequence[int]],
                       mask: Optional[Sequence[Sequence[int]]]) -> Steps:
        tokens, self.pending = self.pending, []
        request = self._request(tokens, list(outputs), positions, mask)
        result = yield _forward(self.queue, request)
        return list(result)

    def forward(self, outputs: Sequence["raw.OutputRequest"] = (), *,
                positions: Optional[Sequence[int]] = None,
                mask: Optional[Sequence[Sequence[int]]] = None) -> list["raw.Output"]:
        """Runs every pending token through the model (the low-level step).

        `outputs` index into the pending tokens; `positions` default to
        continuing the sequence; `mask` is one BRLE per pending token over
        all slots after the pass. Returns one output per request.
        """
        return _drive(self._forward_steps(outputs, positions, mask))

    async def forward_async(self, outputs: Sequence["raw.OutputRequest"] = (), *,
                            positions: Optional[Sequence[int]] = None,
                            mask: Optional[Sequence[Sequence[int]]] = None) -> list["raw.Output"]:
        return await _drive_async(self._forward_steps(outputs, positions, mask))

    def _flush_steps(self, keep_last: bool) -> Steps:
        if len(self.pending) <= (1 if keep_last else 0):
            return None
        last = self.pending[-1:] if keep_last else []
        self.pending = self.pending[:-1] if keep_last else self.pending
        yield from self._forward_steps([], None, None)
        self.pending = last
        return None

    def flush(self) -> None:
        """Prefills the pending tokens (all but the last, which the next
        generate step needs) in one forward pass."""
        _drive(self._flush_steps(keep_last=True))

    async def flush_async(self) -> None:
        await _drive_async(self._flush_steps(keep_last=True))

    def next_distribution(self, k: int = 64, temperature: float = 1.0) -> tuple[list[int], list[float]]:
        """Runs the pending tokens; the top-k next tokens after them and their probabilities.

        The pending tokens are then in KV: `fill_tokens([chosen])` to go on.
        """
        if not self.pending:
            raise ValueError("nothing pending: fill() tokens first")
        spec = raw.DistributionSpec(index=len(self.pending) - 1, k=k, temperature=temperature)
        (out,) = self.forward([raw.OutputRequestDistribution(spec)])
        ids, probs = out.value
        return list(ids), list(probs)

    # Generation ----------------------------------------------------------
    def _generate_steps(self, sampler: Sampler, stop: Stop, drafter: Optional[Drafter],
                        on_token: Optional[Callable[[int], None]],
                        grammar: Union[Grammar, Matcher, None] = None,
                        run_length: Optional[int] = None) -> Steps:
        if not self.pending:
            raise ValueError("nothing to generate from: fill() a prompt first")
        if grammar is not None and drafter is not None:
            raise ValueError("generate() takes a grammar or a drafter, not both")
        stop = stop.bind(self.model.eos_tokens)
        if drafter is None and grammar is None:
            hints = self.model.scheduling()
            run = hints.decode_run if run_length is None else run_length
            if run < 1:
                raise ValueError(f"run_length must be >= 1, got {run}")
            ahead = hints.queue_ahead
            if run > 1 or ahead:
                return (yield from self._run_steps(sampler, stop, on_token, run, ahead))
        matcher = grammar.matcher(self.model) if isinstance(grammar, Grammar) else grammar
        tokenizer = self.model.tokenizer
        generated: list[int] = []
        self.logprobs = [] if sampler.logprobs is not None else None
        reason: Optional[str] = None
        while reason is None:
            draft: list[int] = []
            if drafter is not None:
                room = stop.max_tokens - len(generated) - 1
                if room > 0:
                    draft = list(drafter.draft(self.tokens + self.pending))[:room]
            base = len(self.pending) - 1
            step_sampler = sampler if matcher is None else sampler.with_allowed(matcher.allowed_tokens())
            outputs = [_sample_request(step_sampler, base + i, self._step + i) for i in range(len(draft) + 1)]
            self.pending = self.pending + draft
            results = yield from self._forward_steps(outputs, None, None)
            drawn, infos = _unpack_draws(results)
            # Keep drafts while the model drew the same token; its first
            # different draw (or the draw after the last draft) is the new token.
            accepted: list[int] = []
            for i, token in enumerate(drawn):
                accepted.append(token)
                if i == len(draft) or draft[i] != token:
                    break
            used = 0
            for token in accepted:
                generated.append(token)
                if self.logprobs is not None:
                    self.logprobs.append(infos[used])
                used += 1
                if matcher is not None:
                    matcher.accept(token)
                if on_token is not None:
                    on_token(token)
                text = tokenizer.decode(generated) if stop.needs_text else None
                reason = stop.check(generated, text)
                if reason is None and matcher is not None and matcher.is_done():
                    reason = "grammar"
                if reason is not None:
                    break
            self._step += used
            # KV holds the old pending token(s) and every draft; keep only the
            # drafts that became output before the last used token.
            self._rollback(len(draft) - (used - 1))
            self.pending = [generated[-1]]
        if matcher is not grammar:
            matcher.close()  # made here from a Grammar
        return self._finish(generated, reason, stop)

    def _queue_run(self, tokens: list[int], length: int, sampler: Sampler, step: int,
                   after_previous: bool) -> "_QueuedRun":
        """Queues a decode run of `length` draws from `tokens` (a placeholder
        when `after_previous`): KV room and placeholder ids for the tokens and
        all draws but the last, which stays pending."""
        request = self._request(tokens + [0] * (length - 1),
                                [_sample_request(sampler, len(tokens) - 1, step)], None, None)
        request.tokens = tokens
        request.positions = request.positions[:len(tokens)]
        draws = [_sample_spec(sampler, 0, step + i) for i in range(1, length)]
        future = _forward(self.queue, request, raw.ForwardOptions(feed_previous=after_previous, draws=draws))
        return _QueuedRun(future, length, len(self.tokens) - (length - 1))

    def _run_steps(self, sampler: Sampler, stop: Stop, on_token: Optional[Callable[[int], None]],
                   run: int, ahead: bool) -> Steps:
        """generate() without a drafter or grammar, `run` tokens per
        `forward` call (a decode run): the pending tokens, then passes each fed the token
        the one before drew. With `ahead`, each run is queued before the one
        before it has run (fed its last token), so the engine goes from run
        to run without waiting for this inferlet, which looks at a run's
        tokens while the next one runs. Tokens past a stop, and a run queued
        past it, are rolled back."""
        tokenizer = self.model.tokenizer
        generated: list[int] = []
        self.logprobs = [] if sampler.logprobs is not None else None
        reason: Optional[str] = None
        tokens, self.pending = self.pending, []
        current: Optional[_QueuedRun] = None
        next_run: Optional[_QueuedRun] = None
        try:
            while reason is None:
                if current is None:  # nothing queued: a run from `tokens`
                    current = self._queue_run(tokens, min(run, stop.max_tokens - len(generated)), sampler,
                                              self._step, False)
                    queued_step = self._step + current.length  # the step index of the next draw to queue
                room = stop.max_tokens - (queued_step - self._step) - len(generated)
                if ahead and room > 0:
                    # Token 0 stands in for the last token `current` will draw.
                    next_run = self._queue_run([0], min(run, room), sampler, queued_step, True)
                    queued_step += next_run.length
                waiting, current = current, None
                outputs = yield waiting.future  # the driver waits for it and drops it
                drawn, infos = _unpack_draws(outputs)
                # The drawn tokens now in KV: all but the last, and the last as
                # the first token of the run queued behind (if any).
                if waiting.length > 1:
                    self.tokens[waiting.first_draw_slot:waiting.first_draw_slot + waiting.length - 1] = drawn[:-1]
                if next_run is not None:
                    self.tokens[next_run.first_draw_slot - 1] = drawn[-1]
                used = 0
                for token in drawn:
                    generated.append(token)
                    if self.logprobs is not None:
                        self.logprobs.append(infos[used])
                    used += 1
                    if on_token is not None:
                        on_token(token)
                    reason = stop.check(generated, tokenizer.decode(generated) if stop.needs_text else None)
                    if reason is not None:
                        break
                self._step += used
                if reason is not None:
                    # Forget the draws past the stop, and the run queued behind.
                    self._rollback(waiting.length - used + (next_run.length if next_run is not None else 0))
                else:
                    current, next_run = next_run, None
                    tokens = [generated[-1]]
        finally:
            for queued in (current, next_run):
                if queued is not None:
                    _drop(queued.future)  # a queued run goes ahead anyway; its result is not needed
        self.pending = [generated[-1]]
        return self._finish(generated, reason, stop)

    def _finish(self, generated: list[int], reason: Optional[str], stop: Stop) -> str:
        """Records how generation ended; returns the new text. The last token is pending."""
        if reason == "eos":
            # The end token is not part of the text, and a chat template
            # writes its own end-of-turn when the conversation goes on.
            self.pending = []
            generated.pop()
        if self.logprobs is not None:
            del self.logprobs[len(generated):]  # the end token's
        self.generated = generated
        self.stop_reason = reason
        text = stop.trim(self.model.tokenizer.decode(generated))
        if self._chat_text is not None:
            self._chat.append(raw.ChatMessage(role="assistant", content=text))
            self._chat_text += text
        return text

    def generate(self, sampler: Optional[Sampler] = None, stop: Optional[Stop] = None, *,
                 drafter: Optional[Drafter] = None,
                 on_token: Optional[Callable[[int], None]] = None,
                 grammar: Union[Grammar, Matcher, None] = None,
                 run_length: Optional[int] = None) -> str:
        """Generates until `stop` (default: EOS or 256 tokens); returns the new text.

        Each step is one forward pass of the newest token with a sample
        request at its index. The passes go to the server `run_length` at a
        time (default: the server's `decode_run` hint; 1 = one call per token):
        `on_token` then sees the tokens in bursts, and the passes of a run
        past a stop token are rolled back. When the server asks for it
        (the `queue_ahead` hint: on accelerators), each run is queued
        before the last token of the one before it is known, so the engine
        never waits for this inferlet between runs. With a `drafter`, each pass also verifies the
        drafter's proposed tokens (speculative decoding). With a `grammar`
        (or a `Matcher`, which then advances), each draw is restricted to the
        tokens it allows (replacing `sampler.allowed`) and generation also
        stops, with `stop_reason` "grammar", once the match is finished.
        """
        return _drive(self._generate_steps(sampler or Sampler(), stop or Stop(), drafter, on_token, grammar,
                                           run_length))

    async def generate_async(self, sampler: Optional[Sampler] = None, stop: Optional[Stop] = None, *,
                             drafter: Optional[Drafter] = None,
                             on_token: Optional[Callable[[int], None]] = None,
                             grammar: Union[Grammar, Matcher, None] = None,
                             run_length: Optional[int] = None) -> str:
        """`generate` as a coroutine: concurrent contexts (e.g. forks under
        `asyncio.gather`) wait together and are batched by the server."""
        return await _drive_async(
            self._generate_steps(sampler or Sampler(), stop or Stop(), drafter, on_token, grammar, run_length))

    # Editing the KV ------------------------------------------------------
    def _rollback(self, count: int) -> None:
        """Forgets the last `count` tokens in KV (their slots get overwritten)."""
        if count <= 0:
            return
        if count > self.kv_len:
            raise ValueError(f"cannot roll back {count} tokens of {self.kv_len}")
        dropped_positions = self.positions[-count:]
        del self.tokens[-count:]
        del self.positions[-count:]
        # The next token follows the last one kept. (Not the smallest dropped
        # position: after a tree pass, dropped sibling branches can sit at
        # positions below the kept ones.)
        self.next_position = self.positions[-1] + 1 if self.positions else min(dropped_positions)
        keep = -(-self.kv_len // self.page_size)
        if keep < len(self.pages):
            extra, self.pages = self.pages[keep:], self.pages[:keep]
            self._release_pages(extra)

    def rollback(self, count: int) -> None:
        """Removes the last `count` tokens (in KV) from the sequence."""
        self.pending = []
        self._rollback(count)

    def mask_tokens(self, start: int, end: int, masked: bool = True) -> None:
        """Masks (or unmasks) tokens [start, end) of the KV: masked tokens are
        excluded from all later attention (e.g. windowed attention)."""
        self._check_alive()
        if not 0 <= start <= end <= self.kv_len:
            raise ValueError(f"token range [{start}, {end}) is outside the {self.kv_len} tokens in KV")
        ps = self.page_size
        i = start
        while i < end:
            index, offset = divmod(i, ps)
            count = min(end - i, ps - offset)
            self._own_page(index)
            call(self.queue.mask_slots, self.pages[index], offset, count, masked)
            i += count

    def drop(self, start: int, end: int) -> None:
        """Removes tokens [start, end) from the KV by dropping whole pages.

        The range must cover whole pages (start and end multiples of the
        page size, end no later than the last full page). Positions of the
        remaining tokens do not change, so attention-sink / sliding-window
        inferlets keep RoPE positions growing while the KV stays bounded.
        """
        ps = self.page_size
        full = self.kv_len // ps * ps
        if start % ps or end % ps or not 0 <= start <= end <= full:
            raise ValueError(
                f"drop({start}, {end}): the range must be page-aligned (page size {ps}) "
                f"and within the {full} tokens on full pages"
            )
        first, last = start // ps, end // ps
        dropped = self.pages[first:last]
        del self.pages[first:last]
        del self.tokens[start:end]
        del self.positions[start:end]
        self._release_pages(dropped)

    # Sharing ----------------------------------------------------------------
    def synchronize(self) -> None:
        """Waits until every command issued on this context's queue has taken effect."""
        _get(self.queue.synchronize())

    async def synchronize_async(self) -> None:
        future = self.queue.synchronize()
        try:
            await wait(future)
        except raw.Err as err:
            raise InferletError.from_wit(err.value) from None
        finally:
            _drop(future)

    def _fork_now(self, priority: int) -> "Context":
        child = Context(self.model, priority=priority)
        child.tokens = list(self.tokens)
        child.positions = list(self.positions)
        child.pending = list(self.pending)
        child.next_position = self.next_position
        child._step = self._step
        child._chat = list(self._chat)
        child._chat_text = self._chat_text
        full = self.kv_len // self.page_size
        child.pages = self.pages[:full]
        _refs.retain(child.pages)
        used = self.kv_len - full * self.page_size
        if used:
            # Never share a page someone will write into: copy the partial one.
            fresh = child._allocate(1)[0]
            call(child.queue.copy_slots, self.pages[full], 0, fresh, 0, used)
            child.pages.append(fresh)
        return child

    def fork(self, priority: int = 0) -> "Context":
        """A new context (with its own queue) continuing this sequence.

        Full pages are shared; the partial last page is copied. Both
        contexts then evolve independently.
        """
        self._check_alive()
        self.synchronize()
        return self._fork_now(priority)

    async def fork_async(self, priority: int = 0) -> "Context":
        self._check_alive()
        await self.synchronize_async()
        return self._fork_now(priority)

    def export(self, name: str, persistent: bool = False) -> None:
        """Publishes this context's KV under `name` for `Context.import_`.

        All pending tokens are prefilled first, so the export is complete.
        The token history goes into the key-value store next to it.
        """
        _drive(self._flush_steps(keep_last=False))
        call(self.queue.export_pages, name, list(self.pages), self.last_page_len, persistent)
        _refs.mark_foreign(self.pages)
        call(raw.kvstore.set, _EXPORT_META_PREFIX + name, json.dumps(
            {"tokens": self.tokens, "positions": self.positions, "next_position": self.next_position}))

    def unexport(self, name: str) -> None:
        call(self.queue.unexport, name)
        raw.kvstore.delete(_EXPORT_META_PREFIX + name)

    @classmethod
    def import_(cls, model: Optional[Model], name: str, *, priority: int = 0) -> "Context":
        """A context continuing from the export `name` (sharing its pages, zero copy)."""
        ctx = cls(model, priority=priority)
        pages, last_len = call(ctx.queue.import_pages, name)
        pages = list(pages)
        kv_len = (len(pages) - 1) * ctx.page_size + last_len if pages else 0
        meta_text = raw.kvstore.get(_EXPORT_META_PREFIX + name)
        meta = json.loads(meta_text) if meta_text else None
        if meta is not None and len(meta["tokens"]) == kv_len:
            ctx.tokens = list(meta["tokens"])
            ctx.positions = list(meta["positions"])
            ctx.next_position = int(meta["next_position"])
        else:
            # Exported by something else: the ids are unknown, the positions
            # are taken to be 0..n-1. Only history-based drafters care.
            ctx.tokens = [0] * kv_len
            ctx.positions = list(range(kv_len))
            ctx.next_position = kv_len
        ctx.pages = pages
        # The exporter (and other importers) hold these pages too.
        _refs.retain(pages, foreign=True)
        return ctx

    # Lifetime --------------------------------------------------------------
    def release(self) -> None:
        """Frees this context's pages (those no other context shares) and its queue."""
        if self._released:
            return
        self._released = True
        pages, self.pages = self.pages, []
        self._release_pages(pages)
        _drop(self.queue)

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
