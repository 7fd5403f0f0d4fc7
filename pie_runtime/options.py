"""The engine and runtime options `pie-run` and `pie-serve` share, and what they build from them.

Both commands take the same flags for the model and the devices it runs on
(`engine_jax.options`: --model, the KV pool, --tensor-parallel,
--data-parallel and the multi-host flags), batching, the hints inferlets
get and the limits they run under; `pie-serve` also reads them from a TOML
file (the keys are the flag names without the dashes, see
`pie_runtime.server.config`). One definition here keeps the two in step.

With several processes (--num-processes), process 0 runs the front end;
the others only `follow` it (run its engine steps) and exit with it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from engine_jax.options import positive_int
from pie_runtime.limits import TenantLimits
from pie_runtime.policies import DEFAULT_TOKEN_BUDGET

BATCHING_POLICIES = ("adaptive", "eager", "fixed-size", "fixed-timeout")
QUEUE_AHEAD = {"auto": None, "on": True, "off": False}
# Exit status of either command when a process of a multi-host engine died (in-flight work failed).
EXIT_PROCESS_LOST = 3


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The model and its devices (``engine_jax.options.add_arguments``) and the batching policy."""
    from engine_jax.options import add_arguments

    g = add_arguments(p)
    g.add_argument("--batching", choices=BATCHING_POLICIES, default="adaptive",
                   help="batching policy of the serving core (default adaptive)")
    g.add_argument("--token-budget", type=non_negative_int, default=DEFAULT_TOKEN_BUDGET, metavar="N",
                   help="most new tokens one engine step runs (chunked prefill): a longer forward, such as a "
                        "long prompt, runs in chunks over several steps, and sequences decoding meanwhile get "
                        "a token in each of those steps instead of waiting for the whole prompt; smaller = "
                        "steadier decoding, larger = faster prompts; 0 = no budget, a forward always runs "
                        f"whole (default {DEFAULT_TOKEN_BUDGET})")


def engine_options(opts: argparse.Namespace) -> Any:
    """The ``engine_jax.options.EngineOptions`` of parsed flags (ValueError names a bad one)."""
    from engine_jax.options import EngineOptions

    return EngineOptions.from_args(opts)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """The hints inferlets get, what they may use and the limits they run under."""
    from pie_runtime.policies import DEFAULT_DECODE_RUN

    g = p.add_argument_group("inferlets")
    g.add_argument("--queue-ahead", choices=tuple(QUEUE_AHEAD), default="auto",
                   help="tell inferlets to queue each decode run before the one ahead of it has run, "
                        "so their own work overlaps the engine's: auto = on an accelerator, off on a CPU, "
                        "where it would compete with the step for the cores (default auto)")
    g.add_argument("--decode-run", type=positive_int, default=None, metavar="N",
                   help="tell inferlets to draw N tokens per forward call (a decode run): their per-call work "
                        "is then paid once per N tokens, and tokens arrive N at a time; 1 = a call per "
                        f"token (default {DEFAULT_DECODE_RUN})")
    g.add_argument("--allow", default="", metavar="CAPS",
                   help="capabilities the operator grants: comma list of fs:DIR (read-only), fs-rw:DIR, "
                        "launch (default none)")
    g.add_argument("--cpu-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="CPU time limit per instance (time blocked on the model does not count)")
    g.add_argument("--memory-limit", type=positive_int, default=1024, metavar="MB",
                   help="linear memory limit per instance in MiB (default 1024)")
    g.add_argument("--program", action="append", default=[], metavar="NAME=PATH", dest="programs",
                   help="register another program (.wasm, .py or .js) that instances may launch by NAME (repeatable)")
    TenantLimits.add_arguments(p)


def tenant_limits(opts: argparse.Namespace) -> TenantLimits:
    return TenantLimits.from_args(opts)


def instance_limits(opts: argparse.Namespace) -> Any:
    from pie_runtime.instance import InstanceLimits

    return InstanceLimits(cpu_seconds=opts.cpu_limit, memory_bytes=opts.memory_limit * 1024 * 1024)


@dataclass
class Runtime:
    """A model loaded, its engine and serving core running, and the Wasm host bound to them."""

    built: Any  # engine_jax.options.BuiltEngine: the model and its engine (and this process's part)
    core: Any  # pie_runtime.serving.ServingCore
    host: Any  # pie_runtime.host.registry.Host

    @property
    def loaded(self) -> Any:  # engine_jax.loader.LoadedModel
        return self.built.model

    @property
    def engine(self) -> Any:  # an Engine, or a ReplicatedEngine with --data-parallel
        return self.built.engine

    def stop(self) -> None:
        """Stops the serving core; a multi-host leader then lets its followers exit."""
        self.core.stop()
        self.built.close()


def load_engine(opts: argparse.Namespace, log: Callable[[str], None], prog: str,
                on_lost: Callable[[str], None] | None = None) -> Any:
    """Joins the process group (multi-host), reads the model named by --model onto its devices and
    builds its engine, logging progress; an ``engine_jax.options.BuiltEngine``. ``on_lost(message)``
    runs once if a process of a multi-host engine dies (see ``engine_jax.options.build_engine``)."""
    from engine_jax.options import build_engine

    return build_engine(engine_options(opts), log=lambda text: log(f"{prog}: {text}"), on_lost=on_lost)


def start_runtime(opts: argparse.Namespace, built: Any, *, guest_output: Any, programs: Sequence[Any] = (),
                  limits: TenantLimits | None = None) -> Runtime:
    """Starts the serving core on the built engine and binds a host to it, with `programs`
    registered, under `limits` (default: those given in `opts`)."""
    from pie_runtime.serving import ServingCore
    from pie_runtime.host.registry import Host, ServedModel

    limits = limits if limits is not None else tenant_limits(opts)
    core = ServingCore(built.engine, policy=opts.batching, token_budget=opts.token_budget or None,
                       limits=limits).start()
    served = ServedModel(built.model.name, built.engine, core, QUEUE_AHEAD[opts.queue_ahead], opts.decode_run)
    host = Host([served], guest_output=guest_output, limits=limits)
    for program in programs:
        host.register_program(program)
    return Runtime(built, core, host)


def follow(opts: argparse.Namespace, log: Callable[[str], None], error: Callable[[str], None], prog: str) -> int:
    """A follower process of a multi-host engine (--process-id > 0): builds its part of the engine
    and runs process 0's engine steps until process 0 ends (0), or exits at once with
    EXIT_PROCESS_LOST when process 0 is gone. Raises what ``load_engine`` raises."""
    built = load_engine(opts, log, prog)
    log(f"{prog}: process {opts.process_id} of {opts.num_processes} following process 0 ...")
    if built.follow():
        error(f"{prog}: process {opts.process_id}: the leader (process 0) is gone; exiting")
        exit_now(EXIT_PROCESS_LOST)
    log(f"{prog}: process {opts.process_id}: the leader finished")
    return 0


def exit_now(code: int) -> None:
    """Exits at once: the distributed runtime's orderly shutdown would wait for (or abort on) a dead peer."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
