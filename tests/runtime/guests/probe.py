"""Test guest for the Wasm host, written against the raw generated bindings (no SDK).

One component serves every host test (a componentize-py build costs ~10 s
and ~18 MB): the first argument picks the mode, the result is JSON.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import inference, kvstore, messaging, model, runtime, types


def _code(fn):
    """Runs `fn`; "ok" or the WIT error code it raised."""
    try:
        fn()
        return "ok"
    except Err as e:
        return e.value.code.name.lower().replace("_", "-")


def _open():
    return model.Model.open(runtime.models()[0])


def mode_info(args):
    m = _open()
    info = m.info()
    tok = m.tokenizer()
    text = args[0] if args else "Hello world"
    ids = tok.encode(text)
    vocab = tok.vocabulary()
    try:
        chat = m.apply_chat_template([model.ChatMessage(role="user", content=text)], True)
    except Err as e:
        chat = {"error": e.value.code.name}
    return {
        "version": runtime.version(),
        "instance_id": runtime.instance_id(),
        "arguments": runtime.arguments(),
        "models": runtime.models(),
        "info": {
            "name": info.name, "architecture": info.architecture, "vocab_size": info.vocab_size,
            "page_size": info.page_size, "max_positions": info.max_positions,
            "eos_tokens": info.eos_tokens, "bos_token": info.bos_token,
            "chat_template": info.chat_template,
        },
        "encode": ids,
        "decode": tok.decode(ids),
        "vocab_len": len(vocab),
        "vocab_hex": {str(i): vocab[i].hex() for i in range(0, len(vocab), max(1, len(vocab) // 50))},
        "special": [[t, i] for t, i in tok.special_tokens()],
        "chat": chat,
        "scheduling": _scheduling(m),
    }


def _scheduling(m):
    hints = runtime.scheduling(m)
    return {"decode_run": hints.decode_run, "queue_ahead": hints.queue_ahead}


def _greedy(index):
    return inference.OutputRequest_Sample(inference.SampleSpec(
        index=index, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, allowed=None, logprobs=None))


def _options(feed_previous=False, draws=()):
    return inference.ForwardOptions(feed_previous=feed_previous, draws=list(draws))


def _queue_and_prompt(prompt):
    """A fresh queue on the default model, its page size, and the prompt's tokens."""
    m = _open()
    return m.create_queue(0), m.info().page_size, m.tokenizer().encode(prompt)


def mode_generate(args):
    """Raw prefill + greedy decode: pages managed by hand, one `forward` per
    token and its future's `get` (each pass queued one ahead, fed the token
    the one before draws, with a third argument "next"; N passes per call
    with "runN")."""
    prompt, n = args[0], int(args[1])
    how = args[2] if len(args) > 2 else "single"
    if how == "next":
        return _generate_one_ahead(prompt, n)
    if how.startswith("run"):
        return _generate_in_runs(prompt, n, int(how[3:]))
    q, page_size, tokens = _queue_and_prompt(prompt)
    pages = []
    seq_len = 0
    out = []

    def grow(to_len):
        need = (to_len + page_size - 1) // page_size - len(pages)
        if need > 0:
            pages.extend(q.allocate_pages(need))

    step = tokens
    for _ in range(n):
        grow(seq_len + len(step))
        positions = list(range(seq_len, seq_len + len(step)))
        seq_len += len(step)
        last = seq_len - (len(pages) - 1) * page_size
        request = inference.ForwardRequest(
            tokens=step, positions=positions, pages=list(pages), last_page_len=last,
            mask=None, outputs=[_greedy(len(step) - 1)])
        result = q.forward(request, _options()).get()
        token = result[0].value
        out.append(token)
        step = [token]
    q.free_pages(pages)
    q.synchronize().get()
    return {"tokens": out}


def _generate_one_ahead(prompt, n):
    q, page_size, tokens = _queue_and_prompt(prompt)
    pages = []

    def request(step, start):
        end = start + len(step)
        need = (end + page_size - 1) // page_size - len(pages)
        if need > 0:
            pages.extend(q.allocate_pages(need))
        return inference.ForwardRequest(
            tokens=step, positions=list(range(start, end)), pages=list(pages),
            last_page_len=end - (len(pages) - 1) * page_size, mask=None, outputs=[_greedy(len(step) - 1)])

    current = q.forward(request(tokens, 0), _options())
    seq_len = len(tokens)
    out = []
    for i in range(n):
        ahead = None
        if i + 1 < n:  # queued before `current` has run: fed the token it draws
            ahead = q.forward(request([0], seq_len), _options(feed_previous=True))
            seq_len += 1
        out.append(current.get()[0].value)
        current = ahead
    q.free_pages(pages)
    q.synchronize().get()
    return {"tokens": out}


def _generate_in_runs(prompt, n, run):
    """`run` tokens per `forward` call (draws); the pages cover each whole run."""
    q, page_size, step = _queue_and_prompt(prompt)
    pages = []
    seq_len = 0
    out = []
    while len(out) < n:
        length = min(run, n - len(out))
        end = seq_len + len(step) + length - 1  # the step's tokens, then all but the last drawn one
        need = (end + page_size - 1) // page_size - len(pages)
        if need > 0:
            pages.extend(q.allocate_pages(need))
        request = inference.ForwardRequest(
            tokens=step, positions=list(range(seq_len, seq_len + len(step))), pages=list(pages),
            last_page_len=end - (len(pages) - 1) * page_size, mask=None, outputs=[_greedy(len(step) - 1)])
        draws = [_greedy(0).value for _ in range(length - 1)]
        tokens = [o.value for o in q.forward(request, _options(draws=draws)).get()]
        out.extend(tokens)
        seq_len = end
        step = [tokens[-1]]
    q.free_pages(pages)
    q.synchronize().get()
    return {"tokens": out}


def mode_errors(args):
    m = _open()
    info = m.info()
    q = m.create_queue(0)
    tok = m.tokenizer()
    pages = q.allocate_pages(2)
    ps = info.page_size

    def fwd(**kw):
        req = dict(tokens=[1, 2], positions=[0, 1], pages=[pages[0]], last_page_len=2, mask=None,
                   outputs=[_greedy(1)])
        req.update(kw)
        return q.forward(inference.ForwardRequest(**req), _options()).get()

    def fwd_run(draws=None, **kw):
        req = dict(tokens=[1, 2], positions=[0, 1], pages=[pages[0]], last_page_len=3, mask=None,
                   outputs=[_greedy(1)])
        req.update(kw)
        draws = [_greedy(0).value] if draws is None else draws
        return q.forward(inference.ForwardRequest(**req), _options(draws=draws)).get()

    codes = {
        "decode_out_of_vocab": _code(lambda: tok.decode([info.vocab_size + 5])),
        "open_unknown_model": _code(lambda: model.Model.open("no-such-model")),
        "free_unknown_page": _code(lambda: q.free_pages([987654])),
        "copy_unknown_page": _code(lambda: q.copy_slots(987654, 0, pages[0], 0, 1)),
        "mask_out_of_range": _code(lambda: q.mask_slots(pages[0], ps, 1, True)),
        "forward_unknown_page": _code(lambda: fwd(pages=[987654])),
        "forward_positions_length": _code(lambda: fwd(positions=[0])),
        "forward_bad_token": _code(lambda: fwd(tokens=[1, info.vocab_size + 3])),
        "forward_bad_last_page_len": _code(lambda: fwd(last_page_len=ps + 1)),
        "forward_mask_rows": _code(lambda: fwd(mask=[[0, 2]])),
        "forward_mask_sum": _code(lambda: fwd(mask=[[0, 1], [0, 3]])),
        "sample_allowed_sum": _code(lambda: fwd(outputs=[inference.OutputRequest_Sample(inference.SampleSpec(
            index=1, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, allowed=[0, 3], logprobs=None))])),
        "output_index": _code(lambda: fwd(outputs=[_greedy(7)])),
        "forward_feed_previous_first": _code(lambda: q.forward(inference.ForwardRequest(
            tokens=[0], positions=[0], pages=[pages[1]], last_page_len=1, mask=None, outputs=[_greedy(0)]),
            _options(feed_previous=True)).get()),
        "forward_run_mask": _code(lambda: fwd_run(mask=[[0, 3], [0, 3]])),
        "forward_run_no_sample": _code(lambda: fwd_run(outputs=[])),
        "forward_run_draw_index": _code(lambda: fwd_run(draws=[_greedy(1).value])),
        "forward_run_too_few_slots": _code(lambda: fwd_run(last_page_len=2)),
        "forward_run_past_max_positions": _code(lambda: fwd_run(
            positions=[info.max_positions - 2, info.max_positions - 1])),
        "export_first": _code(lambda: q.export_pages("probe-dup", [pages[0]], 1, False)),
        "export_taken_name": _code(lambda: q.export_pages("probe-dup", [pages[1]], 1, False)),
        "import_unknown": _code(lambda: q.import_pages("no-such-export")),
        "unexport_unknown": _code(lambda: q.unexport("no-such-export")),
        "allocate_too_many": _code(lambda: q.allocate_pages(1 << 30)),
        "kv_set_long_key": _code(lambda: kvstore.set("k" * 5000, "v")),
        "send_too_large": _code(lambda: messaging.send("m" * ((16 << 20) + 1))),
        "broadcast_long_topic": _code(lambda: messaging.broadcast("t" * 5000, "m")),
        "subscribe_long_topic": _code(lambda: messaging.subscribe("t" * 5000)),
    }
    q.unexport("probe-dup")
    # The host must still serve this instance after all of that.
    good = fwd()
    codes["still_serving"] = "ok" if isinstance(good[0].value, int) else "bad"
    allowed_only = int(args[0]) if args else 3
    restricted = fwd(outputs=[inference.OutputRequest_Sample(inference.SampleSpec(
        index=1, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None,
        allowed=[allowed_only, 1, info.vocab_size - allowed_only - 1], logprobs=None))])
    codes["allowed_token"] = restricted[0].value
    q.free_pages(pages)
    q.synchronize().get()
    return codes


def mode_hold_pages(args):
    """Allocates pages and ends without freeing them: the host must release them."""
    q = _open().create_queue(0)
    q.allocate_pages(int(args[0]))
    if len(args) > 1 and args[1] == "trap":
        raise RuntimeError("trap while holding pages")
    return "held"


def mode_export_and_return(args):
    """Fills a page, exports it persistently and returns at once, without
    waiting: the host must still run what was queued before the return."""
    q = _open().create_queue(0)
    page = q.allocate_pages(1)[0]
    tokens = [1, 2, 3]
    q.forward(inference.ForwardRequest(tokens=tokens, positions=[0, 1, 2], pages=[page],
                                       last_page_len=3, mask=None, outputs=[]), _options())
    q.export_pages(args[0], [page], 3, True)
    return "exported"


def mode_import(args):
    q = _open().create_queue(0)
    pages, last = q.import_pages(args[0])
    q.unexport(args[0])  # leaves the pool as the test found it
    q.synchronize().get()
    return json.dumps({"pages": len(pages), "last_page_len": last})


def mode_trap(args):
    raise RuntimeError("deliberate failure in the guest")


def mode_err(args):
    raise Err("deliberate error result")


def mode_loop(args):
    if args and args[0] == "hold":
        _open().create_queue(0).allocate_pages(2)
    x = 0
    while True:
        x += 1


def mode_block(args):
    """Waits for a client message that never comes (until terminated)."""
    if args and args[0] == "hold":
        _open().create_queue(0).allocate_pages(2)
    return messaging.receive().get()


def mode_oom(args):
    if args and args[0] == "hold":
        _open().create_queue(0).allocate_pages(2)
    hog = []
    while True:
        hog.append(bytearray(4 << 20))


def mode_echo(args):
    n = 0
    while True:
        try:
            msg = messaging.receive().get()
        except Err as e:
            if e.value.code == types.ErrorCode.CLOSED:
                break
            raise
        messaging.send(msg.upper())
        n += 1
    return f"echoed {n}"


def _wait_for_key(key):
    while kvstore.get(key) is None:
        runtime.poll([], 5)


def mode_sub(args):
    topic, n = args[0], int(args[1])
    sub = messaging.subscribe(topic)
    kvstore.set(f"ready/{runtime.instance_id()}", "1")
    got = [sub.next().get() for _ in range(n)]
    return {"got": got}


def mode_pub(args):
    topic, n, subscribers = args[0], int(args[1]), int(args[2])
    while len(kvstore.list_keys("ready/")) < subscribers:
        runtime.poll([], 5)
    for i in range(n):
        messaging.broadcast(topic, f"msg-{i}")
    return "published"


def mode_kv(args):
    action = args[0]
    if action == "write":
        kvstore.set(args[1], args[2])
        return "written"
    if action == "read":
        return json.dumps({"value": kvstore.get(args[1]), "keys": kvstore.list_keys(""),
                           "deleted_missing": kvstore.delete("never-set")})
    raise Err(f"unknown kv action {action}")


def mode_poll(args):
    """poll: timeout with nothing ready, then a ready receive among pending ones."""
    r1 = messaging.receive()
    s = messaging.subscribe("poll-topic")
    n1 = s.next()
    timed_out = runtime.poll([r1.pollable(), n1.pollable()], 20)
    messaging.broadcast("poll-topic", "wake")
    ready = runtime.poll([r1.pollable(), n1.pollable()], None)
    return {"timed_out": timed_out, "ready": ready, "value": n1.get(), "ready_flag": n1.pollable().ready()}


def mode_churn(args):
    """Creates and drops many resources, then waits: the test counts the host's live handles."""
    for _ in range(int(args[0])):
        f = messaging.receive()
        with f.pollable() as p:
            p.ready()
        f.__exit__(None, None, None)
        with messaging.subscribe("churn") as sub:
            sub.next().__exit__(None, None, None)
    return messaging.receive().get()


def mode_calls(args):
    """Makes many cheap host calls (records, lists, resources): a host-call cost probe."""
    m = _open()
    tok = m.tokenizer()
    for _ in range(int(args[0])):
        tok.encode("The capital of France is")
        m.info()
        runtime.instance_id()
    return "done"


def mode_runtime(args):
    return {"version": runtime.version(), "instance_id": runtime.instance_id(),
            "arguments": runtime.arguments(), "models": runtime.models()}


def _launch_outcome(program, arguments):
    """{"result": ...} from a child run to completion, or {"code", "message"} of a refused launch or failed child."""
    try:
        return {"result": runtime.launch(program, arguments).get()}
    except Err as e:
        return {"code": e.value.code.name.lower().replace("_", "-"), "message": e.value.message}


def mode_launch_one(args):
    """Launches program args[0] ("" = the probe itself) with args[1:] and waits for it."""
    return _launch_outcome(args[0], args[1:])


def mode_launch_self(args):
    """Launches N children of the probe at once ("{i}" in their arguments becomes the
    child's index), waits for all of them with poll, returns their results in launch order."""
    n, child = int(args[0]), args[1:]
    futures = [runtime.launch("", [a.replace("{i}", str(i)) for a in child]) for i in range(n)]
    pending = list(range(n))
    polls = 0
    while pending:
        ready = runtime.poll([futures[i].pollable() for i in pending], None)
        pending = [i for j, i in enumerate(pending) if j not in ready]
        polls += 1
    results = []
    for f in futures:
        try:
            results.append(f.get())
        except Err as e:
            results.append({"code": e.value.code.name.lower().replace("_", "-"), "message": e.value.message})
    return {"results": results, "polls": polls}


def mode_launch_many(args):
    """Launches up to N children (args[1:]) without waiting for them, stops at the first
    refusal, then waits for a client message (or termination) before returning."""
    n, child = int(args[0]), args[1:]
    futures, refused = [], None
    for _ in range(n):
        try:
            futures.append(runtime.launch("", child))
        except Err as e:
            refused = {"code": e.value.code.name.lower().replace("_", "-"), "message": e.value.message}
            break
    kvstore.set(f"launched/{runtime.instance_id()}", str(len(futures)))
    messaging.receive().get()
    return {"started": len(futures), "refused": refused}


def mode_deep(args):
    """Each level launches the next until a launch is refused; that level reports it."""
    level = int(args[0]) if args else 0
    outcome = _launch_outcome("", ["deep", str(level + 1)])
    if "result" in outcome:
        return outcome["result"]
    return {"level": level, **outcome}


def mode_say(args):
    """Sends each argument to the client; returns this instance's id."""
    for text in args:
        messaging.send(text)
    return runtime.instance_id()


def mode_park(args):
    """Optionally holds N pages, marks itself parked in the kvstore, then waits until terminated."""
    if args:
        _open().create_queue(0).allocate_pages(int(args[0]))
    sub = messaging.subscribe(f"never/{runtime.instance_id()}")
    kvstore.set(f"parked/{runtime.instance_id()}", "1")
    return sub.next().get()


MODES = {name[5:]: fn for name, fn in globals().items() if name.startswith("mode_")}


class Run(exports.Run):
    def run(self) -> str:
        args = runtime.arguments()
        if not args or args[0] not in MODES:
            raise Err(f"first argument must be one of {sorted(MODES)}")
        result = MODES[args[0]](args[1:])
        return result if isinstance(result, str) else json.dumps(result)
