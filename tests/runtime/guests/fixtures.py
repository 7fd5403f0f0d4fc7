"""Helpers the host tests share: built guest components, a served tiny model, and running an instance.

Imported by tests/runtime/test_host*.py. Builds and precompiled components
are cached on disk by content, so each test module pays milliseconds for a
guest after the first build of the session (or of an earlier session).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from pie_runtime.component_cache import ComponentCache
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.host.registry import Host
from pie_runtime.instance import Instance, InstanceLimits
from pie_runtime.messaging import ClientChannel
from pie_runtime.outcome import InstanceOutcome
from tests.runtime.guests.build import build_guest

# A PIE_HOME for tests, kept across sessions: precompiled components and
# pie-build outputs survive, so only the first session pays for compiling.
TEST_PIE_HOME = Path(tempfile.gettempdir()) / "pie-test-guests" / "pie-home"
PRECOMPILED = TEST_PIE_HOME / "precompiled"

# Small enough that leaks show, large enough for every test's sequences.
PAGE_SIZE = 4
NUM_PAGES = 64


def component_cache() -> ComponentCache:
    return ComponentCache(PRECOMPILED)


def load_guest(cache: ComponentCache, name: str) -> Any:
    return cache.load(build_guest(name))


def launch(host: Host, component: Any, *args: str, client: ClientChannel | None = None,
           namespace: str = "default", limits: InstanceLimits | None = None,
           grant: Capabilities = Capabilities()) -> Instance:
    return Instance(host, component, arguments=list(args), client=client, namespace=namespace,
                    limits=limits, grant=grant).start()


def run(host: Host, component: Any, *args: str, timeout: float = 120.0, **kw: Any) -> InstanceOutcome:
    return launch(host, component, *args, **kw).wait(timeout)


def engine_greedy(model: Any, prompt: Sequence[int], n: int, page_size: int = PAGE_SIZE) -> list[int]:
    """Greedy tokens from the engine alone (own KV pool, no serving core, no host): the oracle."""
    from engine_jax.batch import ForwardRequest, Sample
    from engine_jax.engine import Engine

    engine = Engine(model, page_size=page_size, num_pages=(len(prompt) + n) // page_size + 2)
    pages: list[int] = []
    step, length, out = list(prompt), 0, []
    for _ in range(n):
        while len(pages) * page_size < length + len(step):
            pages.extend(engine.pool.alloc(1))
        positions = list(range(length, length + len(step)))
        length += len(step)
        req = ForwardRequest(tokens=step, positions=positions, pages=list(pages),
                             last_page_len=length - (len(pages) - 1) * page_size,
                             outputs=[Sample(index=len(step) - 1)])
        token = int(engine.step([req])[0][0])
        out.append(token)
        step = [token]
    return out
