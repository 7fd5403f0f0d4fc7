"""The server's program store: uploads checked by hash, visible per tenant, bounded by least recent use."""

from __future__ import annotations

import hashlib

import pytest

from pie_client.protocol import ProtocolError
from pie_runtime.host.capabilities import Capabilities
from pie_runtime.server.programs import ProgramStore


def upload(store, tenant, data):
    up = store.begin_upload(tenant, hashlib.sha256(data).hexdigest(), len(data))
    store.add_chunk(up, data)
    return store.finish_upload(up)


def test_uploads_are_per_tenant_and_the_least_recently_used_is_forgotten(samples_built):
    store = ProgramStore(Capabilities(), max_bytes=64 << 20, max_programs=2)
    blobs = [samples_built(name).read_bytes() for name in ("text_completion", "messaging", "chat")]
    hashes = [hashlib.sha256(b).hexdigest() for b in blobs]
    first = upload(store, "alice", blobs[0])
    assert first.program.name == "text-completion" and first.sha256 == hashes[0]
    assert store.has("bob", hashes[0]) is None  # bob never uploaded it
    upload(store, "bob", blobs[0])  # equal bytes: compiled once, now bob's too
    assert store.has("bob", hashes[0]) is first
    upload(store, "alice", blobs[1])
    assert store.has("alice", hashes[0]) is first  # a use makes it the most recent
    upload(store, "alice", blobs[2])  # over the bound: messaging (least recent) goes
    assert store.has("alice", hashes[1]) is None
    assert store.has("alice", hashes[0]) is not None and store.has("alice", hashes[2]) is not None
    with pytest.raises(ProtocolError) as e:
        store.resolve("alice", hashes[1])
    assert e.value.code == "not-found"
