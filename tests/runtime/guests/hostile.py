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


def _forward(q, request):
    """queue.forward under contract 0.1 (the request alone) and 0.2 (with forward-options):
    the contract moves to 0.2 in a concurrent branch."""
    if hasattr(inference, "ForwardOptions"):
        return q.forward(request, inference.ForwardOptions(feed_previous=False, draws=[]))
    return q.forward(request)


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
    result = _forward(q, request).get()
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


def mode_allocate(args):
    """Asks for args[0] pages; reports the error code (or "ok") and, with args[1] = "hold" (or "pin":
    shared with an export and a second set of its own ids), waits for a client message before ending."""
    q = _open().create_queue(0)
    try:
        pages = q.allocate_pages(int(args[0]))
        code = "ok"
    except Err as e:
        code = _code(e)
    if len(args) > 1 and args[1] == "pin" and code == "ok":
        # Shares every page with an export and a second set of ids: no page is exclusive to one holder.
        q.export_pages(f"pin/{runtime.instance_id()}", pages, 1, False)
        q.synchronize().get()
        q.import_pages(f"pin/{runtime.instance_id()}")
    if len(args) > 1 and args[1] in ("hold", "pin"):
        kvstore.set(f"holding/{runtime.instance_id()}", code)
        messaging.receive().get()
    return {"code": code}


def mode_export_spam(args):
    """Fills args[1] pages and exports them persistently as args[0], then ends at once."""
    m = _open()
    q = m.create_queue(0)
    ps = m.info().page_size
    pages = q.allocate_pages(int(args[1]))
    n = len(pages) * ps
    _forward(q, inference.ForwardRequest(tokens=[5] * n, positions=list(range(n)), pages=pages,
                                         last_page_len=ps, mask=None, outputs=[]))
    q.export_pages(args[0], pages, ps, True)
    return "exported"


def mode_kv_flood(args):
    """Stores values of args[0] bytes under new keys until the store refuses: a trap in contract
    0.1 (`set` has no result), an error result from 0.2 on (reported with how many were stored)."""
    value = "v" * int(args[0])
    i = 0
    while True:
        try:
            kvstore.set(f"flood/{i}", value)
        except Err as e:
            return {"stored": i, "code": _code(e), "message": e.value.message}
        i += 1


def mode_spawn(args):
    """Launches up to args[0] children of this program, each sleeping args[1] s, until one is refused."""
    futures, refused = [], None
    for _ in range(int(args[0])):
        try:
            futures.append(runtime.launch("", ["sleep", args[1], "0"]))
        except Err as e:
            refused = {"code": _code(e), "message": e.value.message}
            break
    return {"started": len(futures), "refused": refused}


def mode_flood_output(args):
    """Prints one line of args[0] bytes, then args[1] lines of 1000 bytes."""
    print("y" * int(args[0]))
    line = "x" * 1000
    for _ in range(int(args[1])):
        print(line)
    sys.stdout.flush()
    return "flooded"


def mode_files(args):
    """Reads args[0]/existing.txt and tries to write args[0]/written.txt; reports both."""
    report = {}
    try:
        with open(os.path.join(args[0], "existing.txt")) as f:
            report["read"] = f.read()
    except OSError as e:
        report["read"] = f"error: {e}"
    try:
        with open(os.path.join(args[0], "written.txt"), "w") as f:
            f.write("tenant was here")
        report["write"] = "ok"
    except OSError as e:
        report["write"] = f"error: {e}"
    try:
        os.listdir("/")
        report["root"] = "listed"
    except OSError as e:
        report["root"] = f"error: {e}"
    return report


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
