"""Many hosts: one engine over the devices of several processes, on JAX's own distributed runtime.

Every process calls ``initialize`` (``jax.distributed.initialize``; gloo
collectives on CPU), loads the model onto one mesh spanning all of them and
builds the same ``Engine``. Process 0, the *leader*, runs the host side (the
serving core, the inferlets, the network front); the others, *followers*,
run ``follow``: the same jitted device ops, in the same order, on their
shards. Each op the leader runs goes first to every follower through
``multihost_utils.broadcast_one_to_all`` -- an all-reduce that XLA's
collectives carry -- as a small JSON header (op, static arguments, array
shapes; ``HEADER_BYTES``) and then the op's host arrays themselves.

A follower that dies breaks the next collective: the leader's broadcast or
step fails at once (gloo reports the closed connection), and when idle the
leader sends a ping every ``ping_interval`` seconds so it notices within
about a second. The leader then fails the op in flight and every later one
with ``ProcessLost`` and calls ``on_lost`` once (pie-run reports it and
exits). A follower whose leader is gone returns 1 from ``follow``. A process
that hangs without dying is caught by the coordination service's heartbeat
(``heartbeat_seconds``), which terminates the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
HEARTBEAT_SECONDS = 10
PING_INTERVAL = 1.0


class ProcessLost(RuntimeError):
    """A process of a multi-host engine is gone; the engine cannot run any more."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-host flags (``--coordinator``, ``--num-processes``, ``--process-id``)."""
    group = parser.add_argument_group(
        "many hosts", "run one engine over the devices of several processes (same command on every host; "
                      "process 0 serves, the others follow)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0's coordination service (all processes give the same)")
    group.add_argument("--num-processes", type=int, default=1, metavar="P", help="processes in all (default 1)")
    group.add_argument("--process-id", type=int, default=0, metavar="I", help="this process's id, 0..P-1 (default 0)")


def check_arguments(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """ValueError with a clear message for inconsistent multi-host options."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is outside 0..{num_processes - 1}")
    if num_processes > 1:
        if not coordinator:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator {coordinator!r} is not HOST:PORT")
    elif coordinator:
        raise ValueError("--coordinator needs --num-processes > 1")


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               heartbeat_seconds: int = HEARTBEAT_SECONDS) -> None:
    """Joins the process group (before anything else touches JAX's devices)."""
    import jax

    check_arguments(coordinator, num_processes, process_id)
    # Collectives between CPU devices of different processes (accelerators bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_seconds)
    # The first collective connects gloo, which announces it on stdout: send that to stderr,
    # where the front ends' logs go (their stdout carries the inferlets' output).
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pie: processes joined")
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _encode(op: str, static: dict[str, Any], arrays: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The header (fixed-size bytes) and the flat list of arrays of one op."""
    specs, leaves = [], []
    for key, value in _flatten(arrays):
        if value is None:
            specs.append([key, None, None])
            continue
        value = np.asarray(value)
        specs.append([key, list(value.shape), value.dtype.str])
        leaves.append(value.astype(np.uint8) if value.dtype == np.bool_ else value)
    text = json.dumps({"op": op, "static": static, "arrays": specs}).encode()
    if len(text) > HEADER_BYTES:
        raise ValueError(f"device op header of {len(text)} bytes exceeds {HEADER_BYTES}")
    header = np.zeros(HEADER_BYTES, np.uint8)
    header[:len(text)] = np.frombuffer(text, np.uint8)
    return header, leaves


def _flatten(arrays: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in arrays.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((prefix + key, value))
    return out


def _decode_header(header: np.ndarray) -> tuple[str, dict[str, Any], list]:
    text = bytes(np.asarray(header, np.uint8)).rstrip(b"\0")
    message = json.loads(text)
    return message["op"], message["static"], message["arrays"]


def _rebuild(specs: list, leaves: list[np.ndarray]) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    values = iter(leaves)
    for key, shape, dtype in specs:
        *path, name = key.split(".")
        node = arrays
        for part in path:
            node = node.setdefault(part, {})
        if shape is None:
            node[name] = None
        else:
            value = np.asarray(next(values)).reshape(shape)
            node[name] = value.astype(np.bool_) if np.dtype(dtype) == np.bool_ else value.astype(np.dtype(dtype))
    return arrays


def _broadcast(tree: Any) -> Any:
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def _placeholders(specs: list) -> list[np.ndarray]:
    """Arrays of the announced shapes (a follower's side of the broadcast)."""
    return [np.zeros(shape, np.uint8 if np.dtype(dtype) == np.bool_ else np.dtype(dtype))
            for _, shape, dtype in specs if shape is not None]


class Leader:
    """Process 0's side: sends each device op to the followers before running it (``Engine.leader``)."""

    def __init__(self, on_lost: Callable[[str], None] | None = None, ping_interval: float = PING_INTERVAL) -> None:
        self.on_lost = on_lost
        self.ping_interval = ping_interval
        self._lock = threading.Lock()
        self._lost: str | None = None  # why the engine cannot run any more
        self._pending: Any = None  # the outputs of the last op dispatched
        self._fail_lock = threading.Lock()
        self._last_op = time.monotonic()
        self._closed = threading.Event()
        self._pinger = threading.Thread(target=self._ping_loop, name="pie-leader-ping", daemon=True)
        self._pinger.start()

    @property
    def lost(self) -> str | None:
        """None while every process is there; else what happened."""
        return self._lost

    def run(self, op: str, static: dict[str, Any], arrays: dict[str, Any],
            apply: Callable[[str, dict[str, Any], dict[str, Any]], Any]) -> Any:
        """Sends the op to every follower, then ``apply``-s it here (same order everywhere)."""
        import jax

        header, leaves = _encode(op, static, arrays)
        with self._lock:
            if self._lost is not None:
                raise ProcessLost(self._lost)
            if self._closed.is_set():
                raise ProcessLost("the multi-host engine was closed")
            try:
                # The previous op must have run: XLA:CPU would run this broadcast's all-reduce
                # beside a step still waiting in its own collectives, and gloo would mix them up.
                jax.block_until_ready(self._pending)
                self._pending = None
                _broadcast(header)
                if leaves:
                    _broadcast(leaves)
                result = apply(op, static, arrays)
            except Exception as exc:  # a collective failed: a follower is gone
                raise self._fail(exc) from exc
            self._pending = result
            self._last_op = time.monotonic()
            return result

    def fetch(self, tree: Any) -> Any:
        """Results that are whole on every device, as host arrays (this process's copy)."""
        import jax

        try:
            return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
        except Exception as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        """Tells the followers to return from ``follow`` (they exit); the engine is unusable after."""
        import jax

        with self._lock:
            if self._lost is None and not self._closed.is_set():
                try:
                    jax.block_until_ready(self._pending)
                    _broadcast(_encode("stop", {}, {})[0])
                except Exception as exc:  # noqa: BLE001 - closing anyway
                    log.warning("could not tell the followers to stop: %s", exc)
            self._closed.set()

    def _fail(self, exc: BaseException) -> ProcessLost:
        """Records the first failure and reports it once; the error to raise for this one."""
        with self._fail_lock:  # the engine thread and the pinger may both see the failure
            if self._lost is None:
                self._lost = (f"a process of the multi-host engine is gone ({_one_line(exc)}); "
                              "in-flight work has failed and the engine cannot run any more")
                log.error("%s", self._lost)
                if self.on_lost is not None:
                    threading.Thread(target=self.on_lost, args=(self._lost,), name="pie-process-lost",
                                     daemon=True).start()
        return ProcessLost(self._lost)

    def _ping_loop(self) -> None:
        while not self._closed.wait(self.ping_interval / 4):
            if self._lost is not None:
                return
            if time.monotonic() - self._last_op < self.ping_interval:
                continue
            try:
                self.run("ping", {}, {}, lambda *_: None)
            except ProcessLost:
                return


def follow(engine: Any) -> int:
    """A follower's loop: runs the leader's device ops on ``engine`` until told to stop (0)
    or the leader is gone (1)."""
    import jax

    while True:
        try:
            op, static, specs = _decode_header(_broadcast(np.zeros(HEADER_BYTES, np.uint8)))
            placeholders = _placeholders(specs)
            leaves = _broadcast(placeholders) if placeholders else []
            if op == "stop":
                return 0
            if op == "ping":
                continue
            jax.block_until_ready(engine.apply_device_op(op, static, _rebuild(specs, leaves)))
        except Exception as exc:  # noqa: BLE001 - any failure of a collective: the leader is gone
            log.error("the leader (process 0) is gone: %s", _one_line(exc))
            return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
