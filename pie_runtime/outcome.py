"""How an instance ended: its outcome, and a trap told in words a user can act on.

wasmtime reports a trap with the wasm backtrace and, at times, a later and
less helpful error than the one that caused it; a Python guest prints its
exception on stderr before it traps. `trap_message` keeps the cause, the
host call that trapped, what the guest raised and why it was stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from wasmtime import WasmtimeError


@dataclass
class InstanceOutcome:
    """How an instance ended.

    status: "ok" (run returned ok), "error" (run returned err), "trap" (the
    guest crashed or a host call trapped), "cpu-limit", "terminated",
    "start-failed" (instantiation failed, e.g. memory limit below the
    guest's initial memory).
    """

    instance_id: str
    status: str
    value: str | None = None
    error: str | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    host_calls: int = 0
    kv_pages_peak: int = 0  # the most KV pages the server charged it at once

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        if self.ok:
            return f"instance {self.instance_id}: ok"
        return f"instance {self.instance_id}: {self.status}: {self.error}"


def trap_message(error: WasmtimeError, stop_reason: str | None, host_trap: str | None,
                 stderr_tail: Sequence[str]) -> str:
    """The useful part of a trap: its cause without the wasm backtrace, and what the guest said."""
    text = str(error).strip()
    if "Caused by:" in text:
        cause = text.split("Caused by:", 1)[1].strip()
        lines = [ln.strip() for ln in cause.splitlines() if ln.strip()]
        # "0: msg / 1: deeper msg" chains: keep them on one line.
        text = "; ".join(ln.split(":", 1)[1].strip() if ln[:1].isdigit() and ":" in ln else ln for ln in lines)
    else:
        text = text.splitlines()[0] if text else "trap"
    if "deferred host scope has no call context" in text:
        # wasmtime 50 fails this way when a host function takes list<borrow<T>>.
        text = ("wasmtime cannot pass a list of borrowed handles (list<borrow<pollable>>) to the host; "
                "the contract's runtime.poll must take list<pollable>")
    if host_trap and host_trap not in text:
        text = f"{host_trap} ({text})"
    guest_error = _guest_exception(stderr_tail)
    if guest_error and guest_error not in text:
        text = f"guest raised {guest_error} ({text})"
    if stop_reason and stop_reason not in text:
        text = f"{text} ({stop_reason})"
    return text


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b.*)$")
_OBJECT_TYPE_LINE = re.compile(r"^object type name: (\w+)")


def _guest_exception(stderr_tail: Sequence[str]) -> str | None:
    """The last exception a Python guest reported on stderr before trapping."""
    for line in reversed(stderr_tail):
        line = line.strip()
        match = _EXCEPTION_LINE.match(line) or _OBJECT_TYPE_LINE.match(line)
        if match:
            return match.group(1)
    return None
