"""`pie-run`: run an inferlet on a model, locally, with the terminal as its client.

    pie-run PROGRAM [options] [-- INFERLET-ARGS...]

PROGRAM is a built component (.wasm), an inferlet source (.py or .js, built
on the fly with pie-build), or the name of a bundled sample (text_completion).
What the inferlet sends goes to stdout, one message per line (framed: see
`messaging.frame_line`); lines typed on stdin are what it receives; its return
value is printed last. Logs, progress and the run summary go to stderr, so
stdout stays clean for pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

from pie_runtime.messaging import frame_line

EXIT_OK = 0
EXIT_INSTANCE_FAILED = 1
EXIT_USAGE = 2
# 3: a process of a multi-host engine died (pie_runtime.options.EXIT_PROCESS_LOST)

EPILOG = """\
inferlet arguments:
  Everything after `--` goes to the inferlet and is checked against the
  arguments it declares. `pie-run PROGRAM -- --help` shows them.

examples:
  pie-run sample_inferlets/text_completion.py -- --prompt "Once upon a time" --max-tokens 32
  pie-run --server ws://127.0.0.1:8080 sample_inferlets/text_completion.py -- --prompt "Hi"
  pie-run app.wasm --model ./my-hf-model --instances 16 --batching adaptive
  echo hello | pie-run echo.wasm

output:
  One line per message, then each result: a line break inside a message is
  written as \\n, other control characters as \\xNN (JSON passes unchanged),
  so no inferlet can print a line that passes for another's. With --instances N
  lines start with "[K] "; a child's with "[CHILD-ID] ".

capabilities:
  An inferlet gets a capability only if it declares it and you allow it:
    fs:DIR     DIR mounted read-only at the same path ("filesystem")
    fs-rw:DIR  DIR mounted read-write ("filesystem")
    launch     runtime.launch: start child instances ("launch")
  Network access cannot be granted (wasmtime-py cannot limit a guest's
  sockets to chosen addresses; --allow net is refused).

child instances:
  An inferlet allowed "launch" may start children of itself, or of a program
  registered with --program NAME=PATH (repeatable; .wasm, .py or .js
  like PROGRAM), by NAME, within the launch-tree limits below. Children are
  terminated when their parent ends.

tenant limits and memory pressure:
  KV pages are bounded per instance and per namespace; an allocation past
  those fails, one the pool cannot serve yet waits, and the server preempts
  (moves an instance's pages to host memory, restores them later) instead of
  failing anyone. The summary reports waits, preemptions and time paused.

devices:
  --tensor-parallel N shards the model over N devices, --data-parallel M runs
  M replicas; with --coordinator/--num-processes/--process-id the same
  command on every host runs one engine over all their devices (process 0
  runs the inferlet; the others serve its engine steps until it ends).
{examples}
exit status: 0 when every instance returned ok, 1 when one failed, 2 on a usage error,
3 when a process of a multi-host engine died (in-flight work failed).
"""


def _parser() -> argparse.ArgumentParser:
    from engine_jax.options import EXAMPLES
    from pie_runtime.options import add_engine_options, add_runtime_options, positive_int

    p = argparse.ArgumentParser(
        prog="pie-run",
        description="Run an inferlet (a Pie WebAssembly program) against a model on this machine, "
                    "or on a pie-serve server with --server.",
        epilog=EPILOG.format(examples=EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("program", help="inferlet component (.wasm), inferlet source (.py, .js: built on the fly), "
                                   "or a bundled sample's name (e.g. text_completion)")
    p.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help="run N copies concurrently and print a summary (default 1)")
    p.add_argument("--namespace", default="default",
                   help="user namespace for the key-value store and exports (default 'default')")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors on stderr")
    remote = p.add_argument_group("remote server")
    remote.add_argument("--server", metavar="URL",
                        help="run PROGRAM on a pie-serve server (ws://HOST:PORT) instead of on this machine; "
                             "the model and engine options are then the server's")
    remote.add_argument("--token", metavar="TOKEN",
                        help="bearer token for --server (default: $PIE_TOKEN)")
    add_engine_options(p)
    add_runtime_options(p)
    return p


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


class _Console:
    """Serialized writes to stdout/stderr from many instance threads.

    Whatever an inferlet wrote (messages, results, its stdout/stderr lines)
    is framed to exactly one line, so no instance can print a line that
    passes for another's (or for pie-run's own)."""

    def __init__(self, out: TextIO, err: TextIO, quiet: bool) -> None:
        self.out, self.err, self.quiet = out, err, quiet
        self._lock = threading.Lock()

    def message(self, prefix: str, text: str) -> None:
        """One message or result of an instance: `prefix` is the server's tag, `text` the inferlet's."""
        with self._lock:
            self.out.write(prefix + frame_line(text) + "\n")
            self.out.flush()

    def log(self, text: str) -> None:
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        with self._lock:
            self.err.write(text + "\n")
            self.err.flush()

    def guest_output(self, instance_id: str, stream: str, text: str) -> None:
        self.error(f"[{instance_id} {stream}] {frame_line(text)}")


def _resolve_program(path: Path, console: _Console, scratch: Path) -> Path:
    from inferlet_toolchain.bundled import program_path

    path = program_path(path, "program")
    if path.suffix in (".py", ".js", ".mjs"):
        from inferlet_toolchain.build import build

        console.log(f"pie-run: building {path} ...")
        started = time.perf_counter()
        # pie-build caches by content; the output copy goes to a scratch
        # directory so running a source never writes into the working directory.
        wasm = Path(build(path, output=scratch / f"{path.stem}.wasm", quiet=console.quiet))
        console.log(f"pie-run: built {path.name} in {time.perf_counter() - started:.1f}s")
        return wasm
    return path


def _registered_programs(specs: Sequence[str], allow: Any, console: _Console,
                         scratch: Path) -> list[tuple[str, Path, Any | None, Any]]:
    """--program NAME=PATH values as (name, built component, manifest, grant)."""
    from pie_runtime.host.capabilities import Capabilities

    programs, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--program {spec!r}: expected NAME=PATH")
        if name in seen:
            raise ValueError(f"--program {name!r} is given twice")
        seen.add(name)
        try:
            wasm = _resolve_program(Path(path), console, scratch / "programs" / name)
        except FileNotFoundError as e:
            raise ValueError(f"--program {name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a failed build is a usage error with its message
            raise ValueError(f"--program {name}: cannot build {path}: {e}") from None
        manifest = _read_manifest(wasm, console)
        grant = allow.grant(manifest.capabilities) if manifest is not None else Capabilities()
        programs.append((name, wasm, manifest, grant))
    return programs


def _read_manifest(wasm: Path, console: _Console) -> Any | None:
    """The inferlet's declared manifest, or None for a component built without one
    (arguments then pass through unchecked and no capability is granted)."""
    from inferlet_toolchain.manifest import ManifestError, read_manifest

    try:
        return read_manifest(wasm)
    except ManifestError as e:
        console.log(f"pie-run: {wasm.name}: {e}; arguments are passed through unchecked "
                    f"(embed a manifest with `pie-build {wasm.name} --manifest FILE.toml`)")
        return None


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Entry point of `pie-run`; the streams can be replaced (tests)."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    own_argv, inferlet_argv = _split_argv(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        # argparse writes --help and usage errors to sys.stdout/stderr itself.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(own_argv)
    except SystemExit as e:  # argparse exits on --help and on errors
        return int(e.code or 0)
    console = _Console(stdout, stderr, args.quiet)
    if args.server is None:
        from pie_runtime.options import engine_options, follow

        try:
            engine_options(args)
        except ValueError as e:
            console.error(f"pie-run: {e}")
            return EXIT_USAGE
        if args.process_id != 0:  # a follower of a multi-host engine: no inferlet runs here
            try:
                return follow(args, console.log, console.error, "pie-run")
            except Exception as e:  # noqa: BLE001 - unknown model, bad options: say so and stop
                console.error(f"pie-run: cannot load model {args.model}: {e}")
                return EXIT_USAGE

    with tempfile.TemporaryDirectory(prefix="pie-run-") as scratch:
        return _main(args, inferlet_argv, console, stdin, stdout, Path(scratch))


def _main(args: argparse.Namespace, inferlet_argv: list[str], console: _Console, stdin: TextIO, stdout: TextIO,
          scratch: Path) -> int:
    from pie_runtime.limits import TenantLimits
    from pie_runtime.host.capabilities import Capabilities

    try:
        limits = TenantLimits.from_args(args)
        if args.instances > limits.max_instances:
            raise ValueError(f"--instances {args.instances} is more than --max-instances {limits.max_instances}")
        allow = Capabilities.parse(args.allow)
        wasm = _resolve_program(Path(args.program), console, scratch)
        programs = _registered_programs(args.programs, allow, console, scratch)
    except (ValueError, FileNotFoundError) as e:
        console.error(f"pie-run: {e}")
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - a failed build is a usage error with its message
        console.error(f"pie-run: cannot build {args.program}: {e}")
        return EXIT_USAGE

    manifest = _read_manifest(wasm, console)
    if manifest is not None:
        if any(a in ("-h", "--help") for a in inferlet_argv):
            stdout.write(manifest.format_help().rstrip("\n") + "\n")
            return EXIT_OK
        try:
            inferlet_args = list(manifest.parse_cli(inferlet_argv))
        except (ValueError, SystemExit) as e:
            console.error(f"pie-run: {e}")
            return EXIT_USAGE
        grant = allow.grant(manifest.capabilities)
        program_name = manifest.name
    else:
        if any(a in ("-h", "--help") for a in inferlet_argv):
            console.error(f"pie-run: {wasm} declares no arguments (it has no manifest)")
            return EXIT_OK
        inferlet_args = inferlet_argv
        grant = Capabilities()
        program_name = wasm.stem
    if args.server is not None:
        from pie_runtime.remote_run import run_remote

        return run_remote(args, wasm, inferlet_args, console, stdin)
    return _run(args, limits, wasm, inferlet_args, grant, program_name, manifest, programs, console, stdin)


def _run(args: argparse.Namespace, limits: Any, wasm: Path, inferlet_args: list[str], grant: Any, program_name: str,
         manifest: Any | None, programs: Sequence[tuple[str, Path, Any | None, Any]], console: _Console,
         stdin: TextIO) -> int:
    from pie_runtime.component_cache import default_cache
    from pie_runtime.component_imports import check_imports
    from pie_runtime.errors import PieError
    from pie_runtime.instance import Instance
    from pie_runtime.messaging import ClientChannel
    from pie_runtime.host.registry import Program
    from pie_runtime.options import EXIT_PROCESS_LOST, exit_now, instance_limits, load_engine, start_runtime

    cache = default_cache()
    component = cache.load(wasm)
    console.log(f"pie-run: component {wasm.name} {cache.stats.last_source} in {cache.stats.last_seconds * 1000:.0f} ms")
    registered = [Program(name, cache.load(path), program_manifest, program_grant)
                  for name, path, program_manifest, program_grant in programs]
    for name, loaded_component in [(wasm.name, component), *((p.name, p.component) for p in registered)]:
        try:
            check_imports(loaded_component, cache.engine)
        except PieError as e:
            console.error(f"pie-run: {name}: {e.message}")
            return EXIT_USAGE
    instances: list[Instance] = []
    lost: list[str] = []

    def on_lost(message: str) -> None:  # a process of a multi-host engine died
        lost.append(message)
        console.error(f"pie-run: {message}")
        for inst in list(instances):
            inst.terminate(message)

    try:
        built = load_engine(args, console.log, "pie-run", on_lost)
    except Exception as e:  # noqa: BLE001 - unknown model, bad files: say so and stop
        console.error(f"pie-run: cannot load model {args.model}: {e}")
        return EXIT_USAGE

    runtime = start_runtime(args, built, guest_output=console.guest_output, programs=registered, limits=limits)
    host = runtime.host
    many = args.instances > 1

    for k in range(args.instances):
        prefix = f"[{k}] " if many else ""
        client = ClientChannel(on_send=lambda text, p=prefix: console.message(p, text))
        instances.append(Instance(host, component, arguments=inferlet_args, client=client,
                                  namespace=args.namespace, limits=instance_limits(args), grant=grant,
                                  program_name=program_name, manifest=manifest))

    reader = threading.Thread(target=_pump_stdin, args=(stdin, instances), name="pie-stdin", daemon=True)
    previous_handler = _install_sigint(instances)
    started = time.perf_counter()
    try:
        for inst in instances:
            try:
                inst.start()
            except PieError as e:  # past a tenant limit (e.g. --tree-memory-bytes 0)
                console.error(f"pie-run: cannot start an instance: {e.message}")
                for started_inst in instances:
                    started_inst.terminate("pie-run could not start every instance")
                return EXIT_USAGE
        reader.start()
        outcomes = [inst.wait() for inst in instances]
    finally:
        wall = time.perf_counter() - started
        stats = runtime.core.stats
        runtime.stop()
        _restore_sigint(previous_handler)

    failed = 0
    for k, outcome in enumerate(outcomes):
        prefix = f"[{k}] " if many else ""
        if outcome.ok:
            console.message(prefix, outcome.value or "")
        else:
            failed += 1
            console.error(f"pie-run: {prefix}{outcome.status}: {outcome.error}")
    _summary(console, outcomes, stats, wall, many)
    if lost:
        exit_now(EXIT_PROCESS_LOST)
    return EXIT_OK if failed == 0 else EXIT_INSTANCE_FAILED


def _pump_stdin(stdin: TextIO, instances: Sequence[Any]) -> None:
    """Each stdin line goes to every instance; end of input closes their receive side."""
    try:
        for line in stdin:
            for inst in instances:
                inst.client.deliver(line.rstrip("\n"))
    except (OSError, ValueError):  # closed or unreadable stdin: same as end of input
        pass
    finally:
        for inst in instances:
            inst.client.close_input()


def _install_sigint(instances: Sequence[Any]) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum: int, frame: Any) -> None:
        for inst in instances:
            inst.terminate("interrupted (Ctrl-C)")

    return signal.signal(signal.SIGINT, on_sigint)


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


def _summary(console: _Console, outcomes: Sequence[Any], stats: Any, wall: float, many: bool) -> None:
    ok = sum(1 for o in outcomes if o.ok)
    generated = getattr(stats, "tokens_generated", 0)
    lines = [
        f"pie-run: {ok}/{len(outcomes)} instances ok in {wall:.2f}s wall",
        f"pie-run: {generated} tokens generated ({generated / wall if wall > 0 else 0.0:.1f} tok/s), "
        f"{getattr(stats, 'tokens_processed', 0)} processed in {getattr(stats, 'steps', 0)} engine steps",
    ]
    batches = getattr(stats, "batch_requests", None)
    if batches:
        seen = ", ".join(f"{size}x{count}" for size, count in sorted(batches.items()))
        lines.append(f"pie-run: batch sizes (requests x steps): {seen}; "
                     f"mean {stats.mean_batch_requests:.1f}, max {stats.max_batch_requests}")
    if getattr(stats, "forwards_split", 0):
        lines.append(f"pie-run: chunked prefill: {stats.forwards_split} forwards split by the token budget "
                     f"into {stats.prefill_chunks} chunks")
    if getattr(stats, "alloc_waits", 0) or getattr(stats, "preemptions", 0):
        lines.append(f"pie-run: memory pressure: {stats.alloc_waits} allocations waited "
                     f"({stats.alloc_wait_seconds:.2f}s), {stats.preemptions} preemptions "
                     f"({stats.pages_preempted} pages to host memory), {stats.restores} restores, "
                     f"{stats.paused_seconds:.2f}s paused, {stats.exports_evicted} exports evicted")
    if many:
        cpu = [o.cpu_seconds for o in outcomes]
        lines.append(f"pie-run: instance CPU time: mean {sum(cpu) / len(cpu):.3f}s, max {max(cpu):.3f}s")
    for line in lines:
        console.log(line)


if __name__ == "__main__":
    sys.exit(main())
