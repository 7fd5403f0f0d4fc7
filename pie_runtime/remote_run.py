"""`pie-run --server URL`: the same run, on a `pie-serve` server instead of this machine.

What the user sees is what a local run shows: messages on stdout (prefixed
"[k] " with --instances), stdin lines to every instance's `receive`, guest
output and logs on stderr, the result printed last, the same exit codes.
The program is uploaded only if the server does not hold it yet.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

EXIT_OK = 0
EXIT_INSTANCE_FAILED = 1
EXIT_USAGE = 2


def run_remote(args: Any, wasm: Path, inferlet_args: Sequence[str], console: Any, stdin: TextIO) -> int:
    import os

    from pie_client import PieClientError, SyncPieClient

    if args.programs:
        console.error("pie-run: --program registers programs on this machine; with --server, the server's "
                      "operator registers them (pie-serve --program)")
        return EXIT_USAGE
    token = args.token if args.token is not None else os.environ.get("PIE_TOKEN")
    try:
        client = SyncPieClient(args.server, token)
    except PieClientError as e:
        console.error(f"pie-run: {args.server}: {e}")
        return EXIT_USAGE
    try:
        return _run(client, args, wasm, inferlet_args, console, stdin)
    except PieClientError as e:
        console.error(f"pie-run: {args.server}: {e}")
        return EXIT_USAGE if e.code in ("invalid-argument", "bad-request", "not-found", "too-large",
                                        "compile-failed", "unauthenticated") else EXIT_INSTANCE_FAILED
    finally:
        client.close()


def _run(client: Any, args: Any, wasm: Path, inferlet_args: Sequence[str], console: Any, stdin: TextIO) -> int:
    started = time.perf_counter()
    program = client.upload(wasm)
    console.log(f"pie-run: {program.name} on {args.server} (tenant {client.tenant}) "
                f"in {(time.perf_counter() - started) * 1000:.0f} ms")
    many = args.instances > 1
    instances = [client.launch(program, list(inferlet_args)) for _ in range(args.instances)]
    outcomes: list[Any] = [None] * len(instances)
    readers = [threading.Thread(target=_read_events, args=(inst, k, many, console, outcomes), daemon=True,
                                name=f"pie-events-{k}") for k, inst in enumerate(instances)]
    pump = threading.Thread(target=_pump_stdin, args=(stdin, instances), name="pie-stdin", daemon=True)
    previous = _install_sigint(instances)
    try:
        for reader in readers:
            reader.start()
        pump.start()
        for reader in readers:
            reader.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    failed = 0
    for k, outcome in enumerate(outcomes):
        prefix = f"[{k}] " if many else ""
        if outcome is not None and outcome.kind == "result":
            console.message(prefix, outcome.data or "")
        else:
            failed += 1
            status, error = ("lost", "the connection ended first") if outcome is None else (
                outcome.data["status"], outcome.data["message"])
            console.error(f"pie-run: {prefix}{status}: {error}")
    console.log(f"pie-run: {len(outcomes) - failed}/{len(outcomes)} instances ok in "
                f"{time.perf_counter() - started:.2f}s wall")
    return EXIT_OK if failed == 0 else EXIT_INSTANCE_FAILED


def _read_events(instance: Any, k: int, many: bool, console: Any, outcomes: list[Any]) -> None:
    from pie_client import PieClientError

    prefix = f"[{k}] " if many else ""
    try:
        for event in instance.events():
            if event.kind == "message":
                console.message(prefix, event.data)
            elif event.kind in ("stdout", "stderr"):
                console.guest_output(instance.id, event.kind, event.data)
            else:
                outcomes[k] = event
    except PieClientError as e:
        console.error(f"pie-run: {prefix}{e}")


def _pump_stdin(stdin: TextIO, instances: Sequence[Any]) -> None:
    """Each stdin line goes to every instance; end of input closes their receive side."""
    from pie_client import PieClientError

    try:
        for line in stdin:
            for inst in instances:
                inst.send(line.rstrip("\n"))
    except (OSError, ValueError, PieClientError):  # stdin closed, or the instances have ended
        pass
    finally:
        for inst in instances:
            try:
                inst.close_input()
            except PieClientError:
                pass


def _install_sigint(instances: Sequence[Any]) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum: int, frame: Any) -> None:
        for inst in instances:
            threading.Thread(target=inst.terminate, daemon=True).start()

    return signal.signal(signal.SIGINT, on_sigint)
