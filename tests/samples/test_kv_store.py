"""kv_store.py: values written by one instance are read, listed and deleted by later ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.samples.oracle import PAGE_SIZE

pytestmark = pytest.mark.slow


@pytest.fixture
def host(sample_model_dir: Path):
    """One server for several runs one after another (the store lives as long as it)."""
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from pie_runtime.serving import ServingCore
    from pie_runtime.wasm_host import Host, ServedModel

    loaded = load_model(str(sample_model_dir))
    engine = Engine(loaded, page_size=PAGE_SIZE, num_pages=16)
    core = ServingCore(engine).start()
    try:
        yield Host([ServedModel(loaded.name, engine, core)])
    finally:
        core.stop()


def _run(host, component, *args: str) -> dict:
    from pie_runtime.component_cache import default_cache
    from pie_runtime.instance import Instance
    from pie_runtime.messaging import ClientChannel

    inst = Instance(host, default_cache().load(component), arguments=list(args),
                    client=ClientChannel(on_send=lambda text: None)).start()
    outcome = inst.wait(60)
    assert outcome.ok, outcome.error
    return json.loads(outcome.value)


def test_values_persist_across_instances(samples, host):
    wasm = samples["kv_store"]
    first = _run(host, wasm, "--set=city=Paris;lang=fr", "--get=city")
    assert first["got"] == {"city": "Paris"} and first["runs"] == 1

    second = _run(host, wasm, "--get=city,lang,nope", "--list=*")
    assert second["got"] == {"city": "Paris", "lang": "fr", "nope": None}
    assert second["keys"] == sorted(["city", "lang", "kv-demo/runs"])
    assert second["runs"] == 2

    third = _run(host, wasm, "--delete=city,nope", "--list=*")
    assert third["deleted"] == {"city": True, "nope": False}
    assert third["keys"] == ["kv-demo/runs", "lang"] and third["runs"] == 3
    assert _run(host, wasm, "--get=city,lang")["got"] == {"city": None, "lang": "fr"}
