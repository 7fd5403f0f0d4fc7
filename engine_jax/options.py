"""Engine options shared by the front ends (pie-run, pie-serve): flags, and the engine they build.

(pie-serve reads the same flags' keys from its TOML file: ``pie_runtime.server.config``.)

::

    parser = argparse.ArgumentParser(); options.add_arguments(parser)
    opts = EngineOptions.from_args(parser.parse_args())
    built = build_engine(opts, log=print, on_lost=...)
    if built.is_follower:                                     # --process-id > 0: no serving here
        sys.exit(built.follow())
    ... serve built.engine (an Engine, or a ReplicatedEngine with --data-parallel) ...
    built.close()                                             # lets the followers exit

Devices: ``--tensor-parallel N`` shards the model over N devices
(``engine_jax.sharding``), ``--data-parallel M`` runs M such replicas on the
next devices (``engine_jax.replicas``); N x M devices in all. With
``--num-processes P`` the mesh spans the devices of P processes
(``engine_jax.distributed``): N must then be all of them, and M is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine_jax import distributed
from engine_jax.config import WEIGHT_FORMATS

EXAMPLES = """\
  one device:        --model smollm2-135m-instruct
  int8 weights:      --weights int8
  4-way TP:          --tensor-parallel 4
  2 replicas x TP 2: --tensor-parallel 2 --data-parallel 2
  two hosts:         --tensor-parallel 2 --coordinator 10.0.0.1:7777 --num-processes 2 --process-id 0   (id 1 on the other)
  (a CPU shows N devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)
"""


@dataclass(frozen=True)
class EngineOptions:
    """What model to serve and on which devices (validated on construction)."""

    model: str = ""
    weights: str = "float"  # WEIGHT_FORMATS (engine_jax.quant)
    page_size: int = 16
    kv_pages: int | None = None  # None: as many as the KV memory budget holds
    tensor_parallel: int = 1
    data_parallel: int = 1
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            from engine_jax.registry import DEFAULT_MODEL

            object.__setattr__(self, "model", DEFAULT_MODEL)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "weights":
                if value not in WEIGHT_FORMATS:
                    raise ValueError(f"engine option --weights must be one of {', '.join(WEIGHT_FORMATS)}, "
                                     f"got {value!r}")
            elif field.name in ("model", "coordinator"):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"engine option {field.name} must be a string, got {value!r}")
            elif not (value is None and field.name == "kv_pages"):
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"engine option {_flag(field.name)} must be an integer, got {value!r}")
                if value < (0 if field.name == "process_id" else 1):
                    raise ValueError(f"engine option {_flag(field.name)} must be positive, got {value}")
        distributed.check_arguments(self.coordinator, self.num_processes, self.process_id)
        if self.num_processes > 1 and self.data_parallel > 1:
            raise ValueError("--data-parallel cannot be combined with --num-processes: run one group of "
                             "processes per replica")

    @property
    def is_follower(self) -> bool:
        return self.process_id != 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EngineOptions":
        """From a namespace parsed with ``add_arguments``."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_arguments(parser: argparse.ArgumentParser) -> Any:
    """The engine flags: --model, --weights, --page-size, --kv-pages, --tensor-parallel, --data-parallel
    (returned: their argument group, for a front end's own engine flags) and the multi-host ones."""
    from engine_jax.registry import DEFAULT_MODEL

    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name or path (HF directory, .gguf, converted model); default {DEFAULT_MODEL}")
    g.add_argument("--weights", choices=WEIGHT_FORMATS, default="float",
                   help="how the weights are stored: float = the model's dtype (float32 on CPU, bfloat16 on "
                        "accelerators); int8 = the projections, embedding and LM head as int8 with a float32 "
                        "scale per output channel (weight-only: activations stay float), quantised at load. "
                        "Trade-off: a quarter of float32's weight memory, half of bfloat16's, for a small "
                        "accuracy loss (SmolLM2-135M: float32's greedy token at ~98%% of positions); on GPU/TPU "
                        "the dequantisation fuses into the matmul, but on a CPU decoding is slower than "
                        "float32 (1.0-1.3x the time per step measured): there it only saves memory (default float)")
    g.add_argument("--page-size", type=positive_int, default=16, metavar="N", help="KV slots per page (default 16)")
    g.add_argument("--kv-pages", type=positive_int, default=None, metavar="N",
                   help="KV pages in the pool of each replica (default: as many as the KV memory budget holds)")
    g.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                   help="shard the model over N devices (attention heads, MLP, vocabulary; N must divide "
                        "the query heads; default 1)")
    g.add_argument("--data-parallel", type=positive_int, default=1, metavar="M",
                   help="run M replicas of the (sharded) model on the next devices; an inferlet stays on "
                        "one replica, and imports of another replica's exports are refused (default 1)")
    distributed.add_arguments(parser)
    return g


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class BuiltEngine:
    """The engine ``build_engine`` made, and this process's part in it."""

    options: EngineOptions
    model: Any  # engine_jax.loader.LoadedModel
    engine: Any  # Engine or ReplicatedEngine

    @property
    def is_follower(self) -> bool:
        return self.options.is_follower

    def follow(self) -> int:
        """A follower's whole job: run the leader's device ops until told to stop (0) or the leader is gone (1)."""
        return distributed.follow(self.engine)

    def close(self) -> None:
        """The leader of a multi-host engine tells its followers to stop (others: nothing to do)."""
        leader = getattr(self.engine, "leader", None)
        if leader is not None:
            leader.close()


def build_engine(options: EngineOptions, *, log: Callable[[str], None] = lambda _: None,
                 on_lost: Callable[[str], None] | None = None) -> BuiltEngine:
    """Joins the process group (multi-host), loads the model onto its devices and builds the engine.

    ``on_lost(message)`` is called once (on its own thread) if a process of a multi-host engine
    dies; the engine's in-flight and later work then fails with ``distributed.ProcessLost``.
    Raises ValueError (ShardingError, ModelNotFoundError, ...) with a one-line message on bad input.
    """
    import jax

    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from engine_jax.quant import weight_bytes
    from engine_jax.replicas import ReplicatedEngine
    from engine_jax.sharding import TensorParallel, make_mesh

    o = options
    if o.num_processes > 1:
        log(f"joining {o.num_processes} processes at {o.coordinator} as process {o.process_id} ...")
        distributed.initialize(o.coordinator, o.num_processes, o.process_id)
    devices = jax.devices()
    need = o.tensor_parallel * o.data_parallel
    if o.num_processes > 1 and o.tensor_parallel != len(devices):
        raise ValueError(f"--tensor-parallel {o.tensor_parallel}: the {o.num_processes} processes have "
                         f"{len(devices)} devices in all, and a multi-host engine spans all of them")
    if need > len(devices):
        hint = " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N shows N)" if devices[0].platform == "cpu" else ""
        raise ValueError(f"--tensor-parallel {o.tensor_parallel} x --data-parallel {o.data_parallel} needs {need} "
                         f"devices; {len(devices)} {devices[0].platform} device(s) available{hint}")
    meshes = [None] if need == 1 else [make_mesh(o.tensor_parallel, devices[r * o.tensor_parallel:])
                                       for r in range(o.data_parallel)]
    where = "" if need == 1 else (f" (tensor parallel over {o.tensor_parallel} {devices[0].platform} devices"
                                  f"{f', {o.data_parallel} replicas' if o.data_parallel > 1 else ''})")
    started = time.perf_counter()
    _pull_in_turn(o)
    log(f"loading model {o.model}{where} ...")
    model = load_model(o.model, mesh=meshes[0], weights=o.weights)
    c = model.config
    log(f"read {model.name} ({c.architecture}, vocab {c.vocab_size}, {c.num_layers} layers, "
        f"{weight_bytes(model.params) / 2**20:.0f} MiB of {o.weights} weights) in "
        f"{time.perf_counter() - started:.1f}s; preparing engine ...")
    engines = []
    for mesh in meshes:
        replica = model
        if mesh is not None and mesh is not meshes[0]:  # another replica: copy the weights device to device
            plan = TensorParallel(mesh, c)
            replica = dataclasses.replace(model, params=jax.device_put(model.params, plan.param_shardings(model.params)))
        engines.append(Engine(replica, page_size=o.page_size, num_pages=o.kv_pages, mesh=mesh))
    engine = engines[0] if len(engines) == 1 else ReplicatedEngine(engines)
    if o.num_processes > 1 and not o.is_follower:
        engine.leader = distributed.Leader(on_lost=on_lost)
    log(f"engine ready in {time.perf_counter() - started:.1f}s ({engine.num_pages} KV pages of "
        f"{engine.page_size} slots)")
    return BuiltEngine(o, model, engine)


def _pull_in_turn(options: EngineOptions) -> None:
    """A known model is converted into the cache by process 0 first, then by the others (a no-op
    where they share the cache), so no two processes convert into one directory at once."""
    from engine_jax import registry

    if options.model not in registry.KNOWN_MODELS:
        return
    if options.num_processes == 1:
        registry.pull(options.model)
        return
    from jax.experimental import multihost_utils

    if options.process_id == 0:
        registry.pull(options.model)
    multihost_utils.sync_global_devices("pie: model converted by process 0")
    if options.process_id != 0:
        registry.pull(options.model)
