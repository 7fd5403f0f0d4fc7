"""An inferlet's command queue: every command validated at once, then enqueued in issue order.

Queue methods are called from the instance's own thread: they validate at
once (bad input is a `PieError` raised synchronously, before anything is
queued) and enqueue for the engine thread (`scheduler.py`); commands with a
result return a `concurrent.futures.Future` that fails with a `PieError`. A
decode run (`forward_run`) is enqueued as one forward command per pass and
gathered into one future.

Every method takes the serving core's lock (`ServingCore._cv`), as the
core's own methods do.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engine_jax.batch import Distribution, EngineInputError, ForwardRequest, Logprobs, OutputRequest, Sample

from .commands import CommandQueue, CopySlotsCmd, ForwardCmd, FreeCmd, MaskSlotsCmd, PublishExportCmd, SyncCmd, settle
from .errors import PieError

if TYPE_CHECKING:
    from .serving import InstanceState

# How long `import_pages` waits for an export whose command is still queued
# behind the exporter's earlier commands.
IMPORT_WAIT_S = 60.0


class Queue:
    """An inferlet's command queue. Commands take effect in the order they were issued."""

    def __init__(self, instance: InstanceState, cq: CommandQueue) -> None:
        self._instance = instance
        self._core = instance.core
        self._cq = cq
        self._pages = instance.core._pages

    @property
    def instance_id(self) -> str:
        return self._instance.instance_id

    @property
    def priority(self) -> int:
        return self._cq.priority

    def _check_open(self) -> None:
        self._instance._check_open()
        if self._cq.closed:
            raise PieError.closed("this queue was closed")

    def _push(self, cmd: Any) -> None:
        self._cq.push(cmd)
        self._core._scheduler.pushed(self._cq, cmd)

    # ---- queue ----------------------------------------------------------------
    def set_priority(self, priority: int) -> None:
        check_u32("priority", priority)
        with self._core._cv:
            self._cq.priority = priority

    def synchronize(self) -> Future:
        """Resolves once every earlier command on this queue has taken effect."""
        with self._core._cv:
            self._check_open()
            cmd = SyncCmd()
            self._push(cmd)
            return cmd.future

    def close(self) -> None:
        """No new commands; those already queued still run (frees and exports
        must not be lost because a queue handle was dropped)."""
        with self._core._cv:
            self._cq.closed = True
            if self._cq.drained():
                self._core._scheduler.queues.pop(self._cq.id, None)
            self._core._scheduler.queue_closed(self._cq)

    # ---- pages ----------------------------------------------------------------
    def allocate_pages(self, count: int) -> list[int]:
        """Fresh page ids. Out-of-memory at once (and nothing allocated) past
        the instance's or its namespace's quota (never more than the pool);
        otherwise it may wait, under memory pressure, until pages are free
        or made free by preempting someone (`pie_runtime.pressure`)."""
        check_u32("count", count)
        with self._core._cv:
            self._check_open()
            return self._core._scheduler.allocate(self.instance_id, count)

    def free_pages(self, pages: Sequence[int]) -> None:
        """Releases pages after the earlier commands on this queue; the ids are
        unusable for new commands at once."""
        pages = tuple(pages)
        with self._core._cv:
            self._check_open()
            self._pages.doom(self.instance_id, pages)
            self._push(FreeCmd(pages))

    def copy_slots(self, src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> None:
        with self._core._cv:
            self._check_open()
            self._pages.check_live(self.instance_id, (src, dst))
            self._check_range(src_offset, count, "source")
            self._check_range(dst_offset, count, "destination")
            self._push(CopySlotsCmd(src, src_offset, dst, dst_offset, count))

    def mask_slots(self, page: int, offset: int, count: int, masked: bool) -> None:
        with self._core._cv:
            self._check_open()
            self._pages.check_live(self.instance_id, (page,))
            self._check_range(offset, count, "mask")
            self._push(MaskSlotsCmd(page, offset, count, bool(masked)))

    def _check_range(self, offset: int, count: int, what: str) -> None:
        ps = self._core.page_size
        if offset < 0 or count < 0 or offset + count > ps:
            raise PieError.invalid(f"{what} slots [{offset}, {offset + count}) are outside the page's 0..{ps}")

    # ---- exports --------------------------------------------------------------
    def export_pages(self, name: str, pages: Sequence[int], last_page_len: int, persistent: bool) -> None:
        """Publishes the pages under `name` once earlier commands on this queue
        have written them (an import of the name waits until then)."""
        with self._core._cv:
            self._check_open()
            export = self._pages.reserve_export(self.instance_id, name, tuple(pages), last_page_len, bool(persistent))
            self._push(PublishExportCmd(export))

    def unexport(self, name: str) -> None:
        """Withdraws an export of this namespace; its pages stay with their holders."""
        with self._core._cv:
            self._check_open()
            self._pages.unexport(self._instance.namespace, name)
            self._core._cv.notify_all()

    def import_pages(self, name: str) -> tuple[list[int], int]:
        """New page ids sharing the export's physical pages, and its last-page-len."""
        with self._core._cv:
            self._check_open()
            export = self._pages.lookup_export(self._instance.namespace, name)
            if not export.published and not export.withdrawn:
                if not self._core._scheduler.running:
                    raise PieError.not_found(f"export {name!r} is not published yet (the engine is stopped)")
                self._core._cv.wait_for(lambda: export.published or export.withdrawn, IMPORT_WAIT_S)
                self._check_open()
            if not export.published:
                raise PieError.not_found(f"export {name!r} was withdrawn before it was published")
            return self._pages.import_export(self.instance_id, export)

    def list_exports(self) -> list[str]:
        with self._core._cv:
            return self._pages.list_exports(self._instance.namespace)

    # ---- forward --------------------------------------------------------------
    def forward(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        pages: Sequence[int],
        last_page_len: int,
        mask: np.ndarray | None = None,
        outputs: Sequence[OutputRequest] = (),
        feeds_previous: bool = False,
    ) -> Future:
        """Enqueues a forward pass over new tokens of one sequence. Input the
        engine would reject is a `PieError` raised here, not a failed future.

        With `feeds_previous` the first token is replaced, when the pass runs,
        by the token this queue's previous forward drew (`tokens[0]` is a
        placeholder, validated as given)."""
        cmd = _forward_cmd(tokens, positions, pages, last_page_len, mask, outputs, feeds_previous)
        _check_shape(cmd, self._core.page_size)
        with self._core._cv:
            self._check_open()
            self._pages.check_live(self.instance_id, cmd.pages, distinct=True)
            self._validate(cmd)
            self._push(cmd)
            return cmd.future

    def forward_run(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        pages: Sequence[int],
        last_page_len: int,
        outputs: Sequence[OutputRequest],
        draws: Sequence[Sample],
        feeds_previous: bool = False,
    ) -> Future:
        """Enqueues a decode run: a forward pass over `tokens`, then one pass
        per entry of `draws`, each over one new token, the token the pass
        before it drew (its last sample output), at the next slot and the
        next position (after the last of `positions`), drawing with that
        entry (whose index must be 0).

        `pages` and `last_page_len` describe the sequence after the whole run
        (`len(tokens) + len(draws)` new slots). With `feeds_previous` the
        first pass's first token is replaced as in `forward`. The future
        resolves once the last pass has run, to the first pass's outputs
        followed by one token per draw; if a pass fails, the rest fail with
        it and the future reports the first error. The inferlet hands over
        `len(draws) + 1` tokens of decoding in one call: its own work (and
        the host's) is paid once per run instead of once per token.
        """
        cmd = _forward_cmd(tokens, positions, pages, last_page_len, None, outputs, feeds_previous)
        if not cmd.tokens:
            raise PieError.invalid("a decode run needs at least one new token in its first pass")
        if not any(isinstance(out, Sample) for out in cmd.outputs):
            raise PieError.invalid("a decode run's first pass must draw a token (a sample output) to feed the next")
        for i, draw in enumerate(draws):
            if not isinstance(draw, Sample):
                raise PieError.invalid(f"draws[{i}] is not a sample request")
            if draw.index != 0:
                raise PieError.invalid(f"draws[{i}].index is {draw.index}; a run's later passes have one token (index 0)")
        _check_shape(cmd, self._core.page_size)
        if len(cmd.positions) != len(cmd.tokens):
            raise PieError.invalid(f"{len(cmd.tokens)} tokens but {len(cmd.positions)} positions")
        page_size = self._core.page_size
        total = (len(cmd.pages) - 1) * page_size + cmd.last_page_len
        first_len = total - len(draws)
        if first_len < len(cmd.tokens):
            raise PieError.invalid(
                f"the pages hold {total} slots: too few for {len(cmd.tokens)} tokens and {len(draws)} draws")
        all_pages, last_position = cmd.pages, cmd.positions[-1]
        cmds = [_on_prefix(cmd, all_pages, first_len, page_size)]
        for i, draw in enumerate(draws, start=1):
            follow = ForwardCmd(tokens=(0,), positions=(last_position + i,), pages=(), last_page_len=0,
                                mask=None, outputs=(draw,), feeds_previous=True)
            cmds.append(_on_prefix(follow, all_pages, first_len + i, page_size))
        with self._core._cv:
            self._check_open()
            self._pages.check_live(self.instance_id, all_pages, distinct=True)
            # The first and the last pass whole; between them only the draws
            # differ (their positions lie between, their pages are prefixes).
            self._validate(cmds[0])
            if len(cmds) > 1:
                self._validate(cmds[-1])
            try:
                for i, draw in enumerate(draws[:-1]):
                    self._core.engine.validate_output(draw, i, 1)
            except EngineInputError as exc:
                raise PieError.invalid(str(exc).replace("outputs[", "draws[")) from exc
            for each in cmds:
                self._push(each)
        return _gather_run([each.future for each in cmds])

    def _validate(self, cmd: ForwardCmd) -> None:
        """Validates the command once, here; the scheduler does not validate
        again. Its page ids were checked by `check_live` (the engine does not
        see them: they may map to swapped-out pages now, and copy-on-write
        may remap them before the step); shapes, ranges and tokens do not
        change. Called with the lock held."""
        request = ForwardRequest(
            tokens=cmd.tokens,
            positions=cmd.positions,
            pages=cmd.pages,
            last_page_len=cmd.last_page_len,
            mask=cmd.mask,
            outputs=cmd.outputs,
        )
        try:
            self._core.engine.validate(request, check_pages=False)
        except EngineInputError as exc:
            raise PieError.invalid(str(exc)) from exc


def _forward_cmd(tokens: Sequence[int], positions: Sequence[int], pages: Sequence[int], last_page_len: int,
                 mask: np.ndarray | None, outputs: Sequence[OutputRequest], feeds_previous: bool) -> ForwardCmd:
    cmd = ForwardCmd(
        tokens=tuple(map(int, tokens)),
        positions=tuple(map(int, positions)),
        pages=tuple(map(int, pages)),
        last_page_len=int(last_page_len),
        mask=None if mask is None else np.asarray(mask, dtype=bool),
        outputs=tuple(outputs),
        feeds_previous=bool(feeds_previous),
    )
    for out in cmd.outputs:
        if not isinstance(out, (Sample, Distribution, Logprobs)):
            raise PieError.invalid(f"unknown output request {out!r}")
    return cmd


def _check_shape(cmd: ForwardCmd, page_size: int) -> None:
    if not cmd.pages:
        raise PieError.invalid("a forward needs at least one page")
    if not 1 <= cmd.last_page_len <= page_size:
        raise PieError.invalid(f"last_page_len {cmd.last_page_len} is outside 1..{page_size}")


def _on_prefix(cmd: ForwardCmd, pages: tuple[int, ...], seq_len: int, page_size: int) -> ForwardCmd:
    """`cmd` set to run on the first `seq_len` slots of `pages` (one pass of a decode run)."""
    used = -(-seq_len // page_size)
    cmd.pages = pages[:used]
    cmd.last_page_len = seq_len - (used - 1) * page_size
    return cmd


def _gather_run(futures: list[Future]) -> Future:
    """One future for a decode run's passes: the first pass's outputs, then
    the token each later pass drew; the first failure if any failed."""
    run: Future = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        for future in futures:
            if future.cancelled():
                settle(run, error=PieError.closed("the run was cancelled"))
                return
            error = future.exception()
            if error is not None:
                settle(run, error=error)
                return
        outputs = list(futures[0].result())
        outputs.extend(future.result()[0] for future in futures[1:])
        settle(run, outputs)

    for future in futures:
        future.add_done_callback(one_done)
    return run


def check_u32(what: str, value: int) -> None:
    if not 0 <= int(value) <= 2**32 - 1:
        raise PieError.invalid(f"{what} {value} is outside the u32 range")
