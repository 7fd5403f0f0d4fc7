"""Test guest that attacks the host, written against the raw generated bindings (no SDK).

Each mode is one attack (or the blocking behaviour an attack needs); the first
argument picks it and the result is JSON. tests/runtime/test_hostile.py runs
them beside well-behaved instances and checks what the server knows.
"""

import json
import os
import sys
import time

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import inference, kvstore, messaging, model, runtime


def _code(e):
    return e.value.code.name.lower().replace("_", "-")


def _open():
    return model.Model.open(runtime.models()[0])


def mode_steal(args):
    """The stale-KV attack: takes `args[0]` fresh pages, makes every slot
    attendable (`mask-slots(..., masked=false)`) without writing any, and
    attends all of them with one token in the last slot; returns the
    log-probabilities of tokens 0..args[1]-1. They depend on whatever K/V
    the pages hold."""
    count, vocab = int(args[0]), int(args[1])
    m = _open()
    q = m.create_queue(0)
    ps = m.info().page_size
    pages = q.allocate_pages(count)
    for page in pages:
        q.mask_slots(page, 0, ps, False)
    seq_len = count * ps
    request = inference.ForwardRequest(
        tokens=[1], positions=[seq_len - 1], pages=pages, last_page_len=ps, mask=None,
        outputs=[inference.OutputRequest_Logprobs(inference.LogprobsSpec(index=0, tokens=list(range(vocab))))])
    result = q.forward(request).get()
    q.free_pages(pages)
    q.synchronize().get()
    return {"logprobs": result[0].value}


def mode_snoop(args):
    """Subscribes to a topic (another user's, by name) and reports what arrives within args[1] ms."""
    sub = messaging.subscribe(args[0])
    kvstore.set(f"snooping/{runtime.instance_id()}", "1")
    got = sub.next()
    ready = runtime.poll([got.pollable()], int(args[1]))
    return {"got": got.get() if ready else None}


def mode_spawn_sleepers(args):
    """Launches args[0] children of this program sleeping args[1] s with args[2] pages each, then sleeps too."""
    n, secs, pages = args[0], args[1], args[2]
    children = [runtime.launch("", ["sleep", secs, pages]) for _ in range(int(n))]
    return mode_sleep([secs, pages]) + f" ({len(children)} children)"


def mode_sleep(args):
    """Holds pages and a subscription, marks itself ready, then sleeps inside WASI (not in a host call)."""
    q = _open().create_queue(0)
    q.allocate_pages(int(args[1]))
    sub = messaging.subscribe(f"sleeper/{runtime.instance_id()}")
    kvstore.set(f"sleeping/{runtime.instance_id()}", "1")
    time.sleep(float(args[0]))
    sub.next()
    return "woke up"


MODES = {name[5:]: fn for name, fn in globals().items() if name.startswith("mode_")}


class Run(exports.Run):
    def run(self) -> str:
        args = runtime.arguments()
        if not args or args[0] not in MODES:
            raise Err(f"first argument must be one of {sorted(MODES)}")
        result = MODES[args[0]](args[1:])
        return result if isinstance(result, str) else json.dumps(result)
