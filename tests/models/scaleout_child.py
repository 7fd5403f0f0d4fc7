"""The tensor- and data-parallel checks, run by test_scale_out.py in ONE child process.

JAX fixes its device count when it starts, so 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) need a process of
their own. This script measures; the parent test asserts. It reads a JSON
spec (model directories, a built component) and writes a JSON report:

* ``logits[family][config]``: max |log-prob difference| to one device over a
  prefill and a decode step, for TP=2, TP=4 and DP=2 x TP=2 (both replicas),
  and for qwen3 TP=2 with the Pallas kernel (interpret mode) per shard;
* ``tokens[family][config]``: the tokens drawn in those steps (greedy,
  seeded top-p, masked as a grammar would, top-k distribution ids);
* ``saved[family][config]``: for TP=4 and DP=2 x TP=2, the largest log-prob
  difference between a decode step on the sequences' pages and one on fresh
  pages they were saved into (``save_pages`` / ``load_pages``, preemption's);
* ``collectives[family]``: every collective of the compiled TP=4 decode
  step, with its result shape, plus the weight shapes it must not gather;
* ``texts[family][tp]``: pie-run's greedy completion at TP=1, 2, 4, and
  ``default``: the default model's at TP=1 and 3, the TP=2 refusal;
* ``checkpoint``: a converted checkpoint restored under TP=4, shard by shard;
* ``replicas``: placement and refusals of the data-parallel serving path;
* ``int8[family]``: ``--weights int8`` at TP=4 vs TP=1 (max |log-prob difference| of a prefill and
  a decode step, the greedy tokens) and the per-device shard shapes of a layer's int8 values and scales.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
PROMPT = "Return a new list containing all items from the iterable"


def main(spec_path: str, out_path: str) -> None:
    import jax

    assert jax.device_count() == 8, jax.devices()
    spec = json.loads(Path(spec_path).read_text())
    report: dict = {"logits": {}, "tokens": {}, "saved": {}, "collectives": {}, "texts": {}}
    for family, directory in spec["families"].items():
        logits, tokens, saved, collectives = engine_checks(directory, kernel=family == "qwen3")
        report["logits"][family], report["tokens"][family], report["saved"][family] = logits, tokens, saved
        report["collectives"][family] = collectives
        report["texts"][family] = {tp: pie_run(spec, directory, "--tensor-parallel", tp) for tp in ("1", "2", "4")}
    report["texts"]["mistral"]["dp2xtp2"] = pie_run(spec, spec["families"]["mistral"], "--tensor-parallel", "2",
                                                    "--data-parallel", "2")
    report["default"] = {tp: pie_run(spec, spec["default_model"], "--tensor-parallel", tp) for tp in ("1", "3", "2")}
    report["checkpoint"] = checkpoint_checks(spec["families"]["mistral"], Path(spec["scratch"]))
    report["replicas"] = replica_checks(spec["families"]["mistral"])
    report["int8"] = {family: int8_checks(spec["families"][family]) for family in ("llama", "gemma3")}
    Path(out_path).write_text(json.dumps(report, indent=1))


def engines(directory: str, tp: int, dp: int = 1, attention: str | None = None):
    """(tokenizer, engine) for tp x dp devices (an Engine, or a ReplicatedEngine when dp > 1)."""
    from engine_jax.engine import Engine
    from engine_jax.loader import load_model
    from engine_jax.options import EngineOptions, build_engine
    from engine_jax.sharding import make_mesh

    if dp == 1 and (tp == 1 or attention):
        mesh = make_mesh(tp) if tp > 1 else None
        model = load_model(directory, mesh=mesh)
        return model.tokenizer, Engine(model, page_size=4, num_pages=16, mesh=mesh, attention=attention)
    built = build_engine(EngineOptions(model=directory, page_size=4, kv_pages=16, tensor_parallel=tp,
                                       data_parallel=dp))
    return built.model.tokenizer, built.engine


def engine_checks(directory: str, kernel: bool):
    from engine_jax.batch import Distribution, ForwardRequest, Logprobs, Sample

    results, saved, hlo = {}, {}, None
    layouts = [("tp1", 1, 1, None), ("tp2", 2, 1, None), ("tp4", 4, 1, None), ("dp2xtp2", 2, 2, None)]
    for name, tp, dp, attention in layouts + ([("tp2-kernel", 2, 1, "interpret")] if kernel else []):
        tokenizer, engine = engines(directory, tp, dp, attention)
        vocab = tuple(range(engine.config.vocab_size))
        tokens = tokenizer.encode(PROMPT)[:9]
        # On DP, one sequence on each replica (the pool places a request without `near` on the freest).
        sequences = [engine.pool.alloc(3) for _ in range(dp)]
        prefill = run_step(engine, sequences, tokens, 0, [Logprobs(index=i, token_ids=vocab) for i in range(len(tokens))])
        decode = run_step(engine, sequences, [tokens[3]], len(tokens), [
            Logprobs(index=0, token_ids=vocab), Sample(index=0), Distribution(index=0, k=5),
            Sample(index=0, temperature=0.9, top_p=0.8, seed=7),
            Sample(index=0, allowed=np.arange(len(vocab)) % 2 == 1)])  # a grammar-style mask: odd ids only
        if name in ("tp4", "dp2xtp2"):
            saved[name] = save_and_load(engine, sequences, tokens[4], len(tokens) + 1, vocab)
        if tp == 4 and dp == 1:
            hlo = engine.step_hlo([ForwardRequest(tokens=[5], positions=[9], pages=sequences[0],
                                                  last_page_len=2, outputs=[Sample(index=0)])])
            weights = sorted({tuple(a.shape) for a in _leaves(engine.params) if a.ndim >= 2})
        results[name] = [(np.array(p + [d[0]]), d[1:]) for p, d in zip(prefill, decode)]
    reference, ref_draws = results["tp1"][0]
    logits = {name: max(float(np.abs(lp - reference).max()) for lp, _ in runs)
              for name, runs in results.items() if name != "tp1"}
    draws = {name: [_jsonable(d) for _, d in runs] for name, runs in results.items()}
    assert all(d == _jsonable(ref_draws) for d in draws["tp1"])
    return logits, draws, saved, {"ops": _collectives(hlo), "weights": weights, "layers": engine.config.num_layers}


def save_and_load(engine, sequences, token, start, vocab) -> float:
    """Saves every sequence's pages to the host in one call (across replicas), loads them into
    fresh pages, and runs the same decode step on both: the largest log-prob difference."""
    from engine_jax.batch import Logprobs

    saved = engine.save_pages([p for pages in sequences for p in pages])
    fresh = [engine.pool.alloc(len(pages)) for pages in sequences]
    engine.load_pages([p for pages in fresh for p in pages], saved)
    outputs = [Logprobs(index=0, token_ids=vocab)]
    before, after = (run_step(engine, seqs, [token], start, outputs) for seqs in (sequences, fresh))
    return max(float(np.abs(np.array(a) - np.array(b)).max()) for a, b in zip(before, after))


def run_step(engine, sequences, new, start, outputs):
    """One step running ``new`` tokens from position ``start`` on each sequence (a list of pages)."""
    from engine_jax.batch import ForwardRequest

    return engine.step([ForwardRequest(tokens=new, positions=list(range(start, start + len(new))), pages=pages,
                                       last_page_len=(start + len(new) - 1) % 4 + 1, outputs=outputs)
                        for pages in sequences])


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 5)
    return value


def _collectives(hlo: str) -> list[list]:
    """[op, result shape] of every collective in the compiled step's HLO."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        if m:
            found.append([m.group(3), [int(d) for d in m.group(2).split(",") if d]])
    return found


def pie_run(spec: dict, model: str, *flags: str) -> dict:
    """One `pie-run` of the text-completion component (in this process); exit code, output, stderr tail.
    Prompt and completion fit in one 32-slot page: two compiled step shapes per layout."""
    from pie_runtime.cli import main as pie_run_main

    out, err = io.StringIO(), io.StringIO()
    argv = [spec["wasm"], "--model", model, "--page-size", "32", "--kv-pages", "16", *flags,
            "--", "--prompt", PROMPT, "--max-tokens", "8"]
    with contextlib.redirect_stderr(err):
        code = pie_run_main(argv, stdin=io.StringIO(""), stdout=out, stderr=err)
    return {"code": code, "text": out.getvalue(), "stderr": err.getvalue()[-2000:]}


def checkpoint_checks(directory: str, scratch: Path) -> dict:
    """A converted checkpoint restored under TP=4: every sharded weight split in four, one per device."""
    from engine_jax import checkpoint
    from engine_jax.config import ModelConfig
    from engine_jax.loader import load_model
    from engine_jax.sharding import TensorParallel, make_mesh

    converted = checkpoint.convert(directory, scratch / "converted", progress=False)
    mesh = make_mesh(4)
    plan = TensorParallel(mesh, ModelConfig.from_hf(checkpoint.read_config(converted)))
    restored = checkpoint.restore_converted(converted, functools.partial(plan.hf_target, dtype=np.float32)).state_dict
    tensors = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        array = restored[name]
        tensors[name] = {"shape": list(array.shape), "spec": str(array.sharding.spec),
                         "devices": sorted(s.device.id for s in array.addressable_shards),
                         "shard_shapes": [list(s.data.shape) for s in array.addressable_shards]}
    params = load_model(converted, mesh=mesh).params
    layer = params.layers[0]
    engine_weights = {name: {"shape": list(a.shape), "shard_shapes": [list(s.data.shape) for s in a.addressable_shards]}
                      for name, a in (("w_qkv", layer.w_qkv), ("w_o", layer.w_o), ("w_gate_up", layer.w_gate_up),
                                      ("w_down", layer.w_down), ("embed", params.embed),
                                      ("lm_head", params.lm_head))}
    return {"restored": tensors, "engine": engine_weights}


def int8_checks(directory: str) -> dict:
    """--weights int8 sharded over 4 devices against one device (both int8): log-probs and greedy tokens."""
    from engine_jax.batch import Logprobs, Sample
    from engine_jax.options import EngineOptions, build_engine

    runs = {}
    for tp in (1, 4):
        built = build_engine(EngineOptions(model=directory, weights="int8", page_size=4, kv_pages=16,
                                           tensor_parallel=tp))
        engine, tokens = built.engine, built.model.tokenizer.encode(PROMPT)[:9]
        vocab = tuple(range(engine.config.vocab_size))
        pages = [engine.pool.alloc(3)]
        prefill = run_step(engine, pages, tokens, 0, [Logprobs(index=i, token_ids=vocab) for i in range(len(tokens))])
        decode = run_step(engine, pages, [tokens[3]], len(tokens), [Logprobs(index=0, token_ids=vocab), Sample(index=0)])
        layer = engine.params.layers[0]
        runs[tp] = {"logprobs": np.array(prefill[0] + [decode[0][0]]), "token": decode[0][1],
                    "shards": {f"{name}.{part}": [list(s.data.shape) for s in getattr(getattr(layer, name), part)
                                                  .addressable_shards]
                               for name in ("w_qkv", "w_down") for part in ("values", "scale")}}
    return {"logits": float(np.abs(runs[4]["logprobs"] - runs[1]["logprobs"]).max()),
            "tokens": [runs[1]["token"], runs[4]["token"]], "shards": runs[4]["shards"],
            "shapes": {k: v[0] for k, v in runs[1]["shards"].items()}}


def replica_checks(directory: str) -> dict:
    """Data-parallel serving: placement by `near`, refusals across replicas, two instances on two replicas."""
    from engine_jax.batch import EngineInputError, Sample
    from pie_runtime.errors import PieError
    from pie_runtime.serving import ServingCore

    _, engine = engines(directory, 1, 2)
    out: dict = {"pages_per_replica": engine.pool.pages_per_replica}
    core = ServingCore(engine).start()
    try:
        a, b = core.open_instance("a"), core.open_instance("b")
        qa, qb = a.create_queue(), b.create_queue()
        pages_a, pages_b = qa.allocate_pages(2), qb.allocate_pages(2)
        more_a = qa.allocate_pages(1)
        core_pages = core._pages  # noqa: SLF001 - the test inspects physical placement
        physical = {name: [core_pages.physical(name, v) for v in pages]
                    for name, pages in (("a", pages_a + more_a), ("b", pages_b))}
        out["replica_of"] = {name: sorted({engine.pool.replica_of(p) for p in ps}) for name, ps in physical.items()}
        tokens = [3, 4, 5, 6, 7]
        ra = qa.forward(tokens, range(5), pages_a, 1, outputs=[Sample(index=4)]).result(60)
        rb = qb.forward(tokens, range(5), pages_b, 1, outputs=[Sample(index=4)]).result(60)
        out["same_tokens_on_both"] = ra == rb
        qa.export_pages("prefix", pages_a, 1, False)
        qa.synchronize().result(60)
        imported, _ = qb.import_pages("prefix")
        try:  # refused when its step runs (the serving core maps the pages then), alone
            qb.forward([8], [5], pages_b[:1] + imported[1:], 2, outputs=[Sample(index=0)]).result(60)
            out["mixed_forward_error"] = None
        except PieError as exc:
            out["mixed_forward_error"] = str(exc)
        try:
            engine.copy_slots(physical["a"][0], 0, physical["b"][0], 0, 1)
            out["cross_copy_error"] = None
        except EngineInputError as exc:
            out["cross_copy_error"] = str(exc)
        c = core.open_instance("c")
        qc = c.create_queue()
        only_imported, _ = qc.import_pages("prefix")  # c holds nothing yet: it goes where the export is
        own = qc.allocate_pages(1)
        phys_c = [core_pages.physical("c", v) for v in only_imported + own]
        out["importer_replica"] = sorted({engine.pool.replica_of(p) for p in phys_c})
        rc = qc.forward([8], [5], only_imported[:1] + own, 1, outputs=[Sample(index=0)]).result(60)
        ra2 = qa.forward([8], [5], pages_a[:1] + more_a, 1, outputs=[Sample(index=0)]).result(60)
        out["importer_continues_like_exporter"] = rc == ra2
    finally:
        core.stop()
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
