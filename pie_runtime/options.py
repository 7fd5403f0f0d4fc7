"""The engine and runtime options `pie-run` and `pie-serve` share, and what they build from them.

Both commands take the same flags for the model, the KV pool, batching, the
hints inferlets get and the limits they run under; `pie-serve` also reads
them from a TOML file (the keys are the flag names without the dashes, see
`pie_runtime.server.config`). One definition here keeps the two in step.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pie_runtime.limits import TenantLimits

BATCHING_POLICIES = ("adaptive", "eager", "fixed-size", "fixed-timeout")
QUEUE_AHEAD = {"auto": None, "on": True, "off": False}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--model, the KV pool and the batching policy."""
    from engine_jax.registry import DEFAULT_MODEL

    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or path (HF directory, .gguf, converted model); default {DEFAULT_MODEL}")
    g.add_argument("--page-size", type=positive_int, default=16, metavar="N", help="KV slots per page (default 16)")
    g.add_argument("--kv-pages", type=positive_int, default=None, metavar="N",
                   help="KV pages in the pool (default: the engine's choice)")
    g.add_argument("--batching", choices=BATCHING_POLICIES, default="adaptive",
                   help="batching policy of the serving core (default adaptive)")


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

    loaded: Any  # engine_jax.loader.LoadedModel
    engine: Any  # engine_jax.engine.Engine
    core: Any  # pie_runtime.serving.ServingCore
    host: Any  # pie_runtime.host.registry.Host

    def stop(self) -> None:
        self.core.stop()


def load_engine(opts: argparse.Namespace, log: Callable[[str], None], prog: str) -> tuple[Any, Any]:
    """Reads the model named by --model and builds its engine (logging progress)."""
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model

    log(f"{prog}: loading model {opts.model} ...")
    started = time.perf_counter()
    loaded = load_model(opts.model)
    log(f"{prog}: read {loaded.name} ({loaded.config.architecture}, vocab {loaded.config.vocab_size}, "
        f"{loaded.config.num_layers} layers) in {time.perf_counter() - started:.1f}s; preparing engine ...")
    engine = Engine(loaded, page_size=opts.page_size, num_pages=opts.kv_pages)
    log(f"{prog}: engine ready in {time.perf_counter() - started:.1f}s "
        f"({engine.num_pages} KV pages of {engine.page_size} slots)")
    return loaded, engine


def start_runtime(opts: argparse.Namespace, loaded: Any, engine: Any, *, guest_output: Any,
                  programs: Sequence[Any] = (), limits: TenantLimits | None = None) -> Runtime:
    """Starts the serving core on `engine` and binds a host to it, with `programs` registered,
    under `limits` (default: those given in `opts`)."""
    from pie_runtime.serving import ServingCore
    from pie_runtime.host.registry import Host, ServedModel

    limits = limits if limits is not None else tenant_limits(opts)
    core = ServingCore(engine, policy=opts.batching, limits=limits).start()
    served = ServedModel(loaded.name, engine, core, QUEUE_AHEAD[opts.queue_ahead], opts.decode_run)
    host = Host([served], guest_output=guest_output, limits=limits)
    for program in programs:
        host.register_program(program)
    return Runtime(loaded, engine, core, host)
