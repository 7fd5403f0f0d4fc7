"""Launching inferlets: the precompiled component cache and concurrent starts."""

from __future__ import annotations

import os
import time

import wasmtime

from pie_runtime.component_cache import ComponentCache, cache_key
from pie_runtime.host.registry import Host
from tests.runtime.guests.build import build_guest
from tests.runtime.guests.fixtures import PRECOMPILED, launch

# A tiny valid component: exercises the cache without a multi-second compile.
TINY = bytes(wasmtime.wat2wasm('(component (core module $m (func (export "f"))))'))


def test_cache_compiles_once_then_deserializes(tmp_path):
    first = ComponentCache(tmp_path)
    first.load(TINY)
    assert first.stats.last_source == "compiled"
    artifact = tmp_path / f"{cache_key(TINY)}.cwasm"
    assert artifact.is_file()

    second = ComponentCache(tmp_path)  # what a new server process sees
    second.load(TINY)
    assert second.stats.last_source == "deserialized"
    second.load(TINY)
    assert second.stats.last_source == "memory"
    assert (second.stats.compiled, second.stats.deserialized, second.stats.memory_hits) == (0, 1, 1)


def test_a_corrupt_artifact_is_recompiled(tmp_path):
    ComponentCache(tmp_path).load(TINY)
    artifact = tmp_path / f"{cache_key(TINY)}.cwasm"
    artifact.write_bytes(b"not a precompiled component")
    cache = ComponentCache(tmp_path)
    cache.load(TINY)
    assert cache.stats.last_source == "compiled"
    assert ComponentCache(tmp_path).load(TINY) is not None
    assert artifact.read_bytes() != b"not a precompiled component"


def test_different_bytes_get_different_artifacts(tmp_path):
    other = bytes(wasmtime.wat2wasm('(component (core module $m (func (export "g"))))'))
    assert cache_key(TINY) != cache_key(other)
    cache = ComponentCache(tmp_path)
    cache.load(TINY)
    cache.load(other)
    assert cache.stats.compiled == 2 and len(list(tmp_path.glob("*.cwasm"))) == 2


def test_a_cached_guest_loads_without_recompiling_and_runs():
    wasm = build_guest("trivial")
    ComponentCache(PRECOMPILED).load(wasm)  # compiles only if no earlier run did
    fresh = ComponentCache(PRECOMPILED)
    component = fresh.load(wasm)
    assert fresh.stats.last_source == "deserialized"
    assert fresh.stats.compiled == 0
    host = Host([], guest_output=lambda *a: None)
    inst = launch(host, component)
    out = inst.wait(60)
    assert out.ok and out.value == inst.instance_id


def test_concurrent_launches_all_run_with_their_own_identity():
    component = ComponentCache(PRECOMPILED).load(build_guest("trivial"))
    host = Host([], guest_output=lambda *a: None)
    instances = [launch(host, component) for _ in range(16)]
    outcomes = [i.wait(120) for i in instances]
    assert all(o.ok for o in outcomes), [o.describe() for o in outcomes if not o.ok]
    assert [o.value for o in outcomes] == [i.instance_id for i in instances]
    assert len({o.value for o in outcomes}) == 16
    assert all(i.first_host_call_at is not None and i.first_host_call_at >= i.launched_at for i in instances)


def _tiny(export: str) -> bytes:
    return bytes(wasmtime.wat2wasm(f'(component (core module $m (func (export "{export}"))))'))


def test_a_new_manifest_reuses_the_compiled_code(tmp_path):
    """Equal code, different manifests (pie-build --manifest again): one artifact, one compile."""
    from inferlet_toolchain.manifest import Manifest, embed, read_manifest_bytes

    first = embed(TINY, Manifest(name="first"))
    second = embed(TINY, Manifest(name="second", description="re-declared"))
    assert first != second and read_manifest_bytes(second).name == "second"
    assert cache_key(first) == cache_key(second) == cache_key(TINY)
    ComponentCache(tmp_path).load(first)
    cache = ComponentCache(tmp_path)
    cache.load(second)
    assert cache.stats.last_source == "deserialized" and cache.stats.compiled == 0
    assert len(list(tmp_path.glob("*.cwasm"))) == 1


def test_the_directory_keeps_within_its_bound_dropping_the_least_recently_used(tmp_path):
    a, b, c = _tiny("a"), _tiny("b"), _tiny("c")
    filler = ComponentCache(tmp_path)
    filler.load(a)
    filler.load(b)
    path = {name: tmp_path / f"{cache_key(w)}.cwasm" for name, w in (("a", a), ("b", b), ("c", c))}
    now = time.time()
    os.utime(path["a"], (now - 100, now - 100))
    os.utime(path["b"], (now - 50, now - 50))
    bound = path["a"].stat().st_size + path["b"].stat().st_size + 64
    cache = ComponentCache(tmp_path, max_bytes=bound)
    cache.load(a)  # a deserialized: now the most recently used
    assert cache.stats.last_source == "deserialized"
    cache.load(c)  # compiled: over the bound, so b (least recently used) goes
    assert path["a"].is_file() and path["c"].is_file() and not path["b"].exists()
    assert cache.stats.evicted == 1
    assert sum(p.stat().st_size for p in tmp_path.glob("*.cwasm")) <= bound


def test_the_in_memory_table_is_bounded(tmp_path):
    cache = ComponentCache(tmp_path, max_in_memory=1)
    cache.load(TINY)
    cache.load(_tiny("other"))
    cache.load(TINY)  # pushed out of the table by the other one: read from disk again
    assert cache.stats.last_source == "deserialized"
    cache.load(TINY)
    assert cache.stats.last_source == "memory"
