"""Fixtures for the sample-inferlet tests: every sample built once per session, run through `pie-run`.

Each sample is built by pie-build and precompiled by wasmtime once (both
cached on disk by content, in the tests' PIE_HOME, so a later session pays
nothing for unchanged samples). The first test that needs a sample builds
all of them, two at a time: componentize-py runs in a child process and
wasmtime compiles without the GIL, so the cores work in parallel.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pie_runtime import component_cache
from pie_runtime.component_cache import ComponentCache
from tests.runtime.guests.fixtures import PRECOMPILED, TEST_PIE_HOME
from tests.samples.oracle import PAGE_SIZE, Oracle

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sample_inferlets"
BUILT = TEST_PIE_HOME / "samples"

# The samples these tests run (all built together on first use).
SAMPLE_NAMES = (
    "chat", "beam_search", "speculative_decoding", "prefix_caching", "attention_sink",
    "output_validation",
    "tree_of_thought", "skeleton_of_thought", "watermarking", "hierarchical_attention", "agent_react",
    "agent_swarm", "kv_store", "messaging", "jacobi_decoding", "windowed_attention",
    "graph_of_thought", "recursion_of_thought",
)

# Random Mistral weights: its greedy output changes with the context (the
# tiny random Llama repeats one token whatever the prompt, which would let a
# broken KV cache pass for a good one).
FAMILY = "mistral"

# Small pages so that short prompts already span several (forks, drops and
# copies then cross page boundaries); the oracle uses the same page size.
MODEL_OPTS = ["--page-size", str(PAGE_SIZE), "--kv-pages", "128"]


@pytest.fixture(scope="package", autouse=True)
def samples_pie_home() -> Iterator[None]:
    """pie-run's caches (pie-build outputs, precompiled components) go to the tests' PIE_HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PIE_HOME", str(TEST_PIE_HOME))
    mp.setattr(component_cache, "_default_cache", ComponentCache(PRECOMPILED))
    yield
    mp.undo()


def build_and_precompile(name: str) -> Path:
    """Builds sample `name` (Python; `name.js` for JavaScript) and precompiles it."""
    from inferlet_toolchain.build import build

    source = SAMPLES / (name if name.endswith(".js") else f"{name}.py")
    wasm = build(source, BUILT / f"{source.stem}{'_js' if source.suffix == '.js' else ''}.wasm", quiet=True)
    # A cache of its own per thread: one cache compiles one component at a time.
    ComponentCache(PRECOMPILED).load(wasm)
    return Path(wasm)


@pytest.fixture(scope="package")
def samples(samples_pie_home: None) -> dict[str, Path]:
    """name -> built component of every sample in SAMPLE_NAMES."""
    BUILT.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SAMPLE_NAMES, pool.map(build_and_precompile, SAMPLE_NAMES)))


@dataclass
class RunResult:
    code: int
    messages: list[str]  # what the inferlet sent, one per line, in order
    result: str  # what main returned (printed last)
    stderr: str

    def json(self) -> Any:
        return json.loads(self.result)

    def sent_json(self) -> list[Any]:
        return [json.loads(m) for m in self.messages]


@pytest.fixture(scope="session")
def sample_model_dir(small_model_dir: Callable[[str], Path]) -> Path:
    return small_model_dir(FAMILY)


@pytest.fixture(scope="session")
def pie_run(sample_model_dir: Path) -> Callable[..., RunResult]:
    """Runs a component with `pie-run` (its real CLI entry point) on the tiny model."""
    from pie_runtime.cli import main

    def run(component: Path, *inferlet_args: Any, stdin: str = "", options: tuple = ()) -> RunResult:
        out, err = io.StringIO(), io.StringIO()
        argv = [str(component), "--model", str(sample_model_dir), *MODEL_OPTS, *map(str, options),
                "--", *map(str, inferlet_args)]
        code = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
        lines = out.getvalue().splitlines()
        assert code == 0, f"pie-run exited {code}:\n{err.getvalue()}"
        return RunResult(code, lines[:-1], lines[-1] if lines else "", err.getvalue())

    return run


@pytest.fixture(scope="session")
def oracle(sample_model_dir: Path) -> Oracle:
    from tests.helpers.engine_models import load_test_model

    return Oracle(load_test_model(sample_model_dir))


@pytest.fixture
def server(sample_model_dir: Path):
    """One long-lived server (serving core + host), as `pie-run` builds it, for
    several runs one after another: exports and the key-value store live as long as it."""
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from pie_runtime.serving import ServingCore
    from pie_runtime.host.registry import Host, ServedModel

    loaded = load_model(str(sample_model_dir))
    engine = Engine(loaded, page_size=PAGE_SIZE, num_pages=128)
    core = ServingCore(engine).start()
    try:
        yield Host([ServedModel(loaded.name, engine, core)])
    finally:
        core.stop()


def run_on(host: Any, component: Path, *args: str, timeout: float = 120) -> Any:
    """Runs one instance of `component` on `host`; returns its JSON result."""
    return json.loads(run_instance(host, component, *args, timeout=timeout).value)


def run_instance(host: Any, component: Path, *args: Any, timeout: float = 120) -> Any:
    """Runs one instance of `component` on `host`; returns its outcome (which
    says, e.g., how many KV pages the server charged it at most)."""
    from pie_runtime.component_cache import default_cache
    from pie_runtime.instance import Instance
    from pie_runtime.messaging import ClientChannel

    inst = Instance(host, default_cache().load(component), arguments=[str(a) for a in args],
                    client=ClientChannel(on_send=lambda text: None)).start()
    outcome = inst.wait(timeout)
    assert outcome.ok, outcome.error
    return outcome
