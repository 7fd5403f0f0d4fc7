"""What one server hosts: its models, the programs instances may launch, its live instances, and the services they share.

One `Host` per server holds the wasmtime Linker (built once, shared by all
instances: wasmtime lets many stores instantiate through one linker) and the
services behind it: the served models and their serving cores, the broadcast
broker and the key-value store.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import wasmtime

from pie_runtime import component_cache
from pie_runtime.errors import PieError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.linker import build_linker
from pie_runtime.kvstore import KVStore
from pie_runtime.limits import TenantLimits
from pie_runtime.messaging import Broker
from pie_runtime.policies import DEFAULT_DECODE_RUN

SERVER_VERSION = "0.1.0"


@dataclass
class ServedModel:
    """A model this server serves: the engine (tokenizer, config) and the serving core that batches it."""

    name: str
    engine: Any  # engine_jax.engine.Engine
    core: Any  # pie_runtime.serving.ServingCore
    # runtime.scheduling's queue-ahead hint; None = on when the engine runs on an accelerator.
    queue_ahead: bool | None = None

    # runtime.scheduling's decode-run hint: tokens per `forward` call; None = DEFAULT_DECODE_RUN.
    decode_run: int | None = None

    @property
    def decodes_one_ahead(self) -> bool:
        if self.queue_ahead is not None:
            return self.queue_ahead
        return self.engine.platform != "cpu"

    @property
    def decode_run_length(self) -> int:
        return DEFAULT_DECODE_RUN if self.decode_run is None else self.decode_run

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.engine.config.vocab_size)

    @property
    def page_size(self) -> int:
        return int(self.engine.page_size)


@dataclass(frozen=True)
class Program:
    """A component instances may launch (`runtime.launch`), with what it declared.

    `manifest` is duck-typed (inferlet_toolchain.manifest.Manifest: `parse_cli`)
    so this layer does not import the toolchain; None for a component built
    without one (its arguments pass through unchecked)."""

    name: str
    component: Any  # wasmtime.component.Component
    manifest: Any | None = None
    grant: Capabilities = Capabilities()

    def check_arguments(self, arguments: Sequence[str]) -> list[str]:
        """The canonical argument list, or `invalid-argument` with the manifest's reason."""
        if self.manifest is None:
            return list(arguments)
        try:
            return list(self.manifest.parse_cli(list(arguments)))
        except Exception as e:  # ArgumentError, or HelpRequested whose message is the usage text
            raise PieError.invalid(f"arguments for {self.name!r}: {e}") from None


GuestOutput = Callable[[str, str, str], None]  # (instance id, "stdout" | "stderr", text)


def stderr_guest_output(instance_id: str, stream: str, text: str) -> None:
    """Default sink for a guest's stdout/stderr: our stderr, one prefixed line each."""
    sys.stderr.write(f"[{instance_id[:8]} {stream}] {text}\n")
    sys.stderr.flush()


class Host:
    """The server side of the contract: models, messaging, key-value store and the linker binding them."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        broker: Broker | None = None,
        kvstore: KVStore | None = None,
        guest_output: GuestOutput = stderr_guest_output,
        wasm_engine: wasmtime.Engine | None = None,
        version: str = SERVER_VERSION,
        limits: TenantLimits | None = None,
    ) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.limits = limits if limits is not None else TenantLimits()
        self.broker = broker if broker is not None else Broker()
        self.kvstore = kvstore if kvstore is not None else KVStore(self.limits)
        self.guest_output = guest_output
        self.wasm_engine = wasm_engine if wasm_engine is not None else component_cache.shared_engine()
        self.version = version
        self.linker = build_linker(self.wasm_engine)
        # Programs instances may launch by name (pie-run --program NAME=PATH).
        self.programs: dict[str, Program] = {}
        self._live: set[str] = set()  # instances admitted whose thread has not ended
        self._live_lock = threading.Lock()

    def admit(self, instance_id: str) -> None:
        """Counts a starting instance; out-of-memory past `max_instances`."""
        with self._live_lock:
            if len(self._live) >= self.limits.max_instances:
                raise PieError.out_of_memory(
                    f"the server already runs {len(self._live)} instances, the most allowed (max_instances)")
            self._live.add(instance_id)

    def retire(self, instance_id: str) -> None:
        with self._live_lock:
            self._live.discard(instance_id)

    def live_instances(self) -> int:
        """Instances started whose thread has not ended yet (terminated ones
        still blocked in a WASI call included)."""
        with self._live_lock:
            return len(self._live)

    def register_program(self, program: Program) -> None:
        if not program.name:
            raise ValueError("a registered program needs a name ('' means the caller's own program)")
        self.programs[program.name] = program

    def program(self, name: str) -> Program:
        found = self.programs.get(name)
        if found is None:
            raise PieError.not_found(f"no program {name!r} is registered with this server; "
                                     f"registered: {sorted(self.programs)}")
        return found

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise PieError.not_found(f"no model {name!r}; this server serves {sorted(self.models)}")
        return served

