"""kv_store.py: values written by one instance are read, listed and deleted by later ones."""

from __future__ import annotations

import pytest

from tests.samples.conftest import run_on

pytestmark = pytest.mark.slow



def test_values_persist_across_instances(samples, server):
    wasm = samples["kv_store"]
    first = run_on(server, wasm, "--set=city=Paris;lang=fr", "--get=city")
    assert first["got"] == {"city": "Paris"} and first["runs"] == 1

    second = run_on(server, wasm, "--get=city,lang,nope", "--list=*")
    assert second["got"] == {"city": "Paris", "lang": "fr", "nope": None}
    assert second["keys"] == sorted(["city", "lang", "kv-demo/runs"])
    assert second["runs"] == 2

    third = run_on(server, wasm, "--delete=city,nope", "--list=*")
    assert third["deleted"] == {"city": True, "nope": False}
    assert third["keys"] == ["kv-demo/runs", "lang"] and third["runs"] == 3
    assert run_on(server, wasm, "--get=city,lang")["got"] == {"city": None, "lang": "fr"}
