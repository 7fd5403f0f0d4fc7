"""Peak host memory and time of loading a model, each load in a fresh process.

    PYTHONPATH=. .venv/bin/python benchmarks/load_memory.py [--model M ...] [--weights float int8]

For every model x weight format, a child process imports JAX, starts the
CPU backend, then runs ``engine_jax.loader.load_model`` and reports:

* ``peak``: the largest anonymous resident memory (Linux ``RssAnon``,
  sampled every 5 ms by ``engine_jax.checkpoint.PeakMemory``) above the
  level before the load. On CPU the loaded weights live in host memory, so
  this includes them: the rest is what loading held on top (sources read or
  dequantised, copies);
* ``weights``: the bytes of the loaded parameters;
* ``maxrss``: the process's peak resident set (``getrusage``), JAX included;
* the load time.

A known model is converted into the cache first (outside the measurement).
GGUF files load tensor by tensor as the layers are built; converted models
restore a layer's tensors at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402

CHILD = """
import json, resource, sys, time
import jax, numpy as np
jax.devices()
from engine_jax.checkpoint import PeakMemory
from engine_jax.loader import load_model
name, weights = sys.argv[1], sys.argv[2]
started = time.perf_counter()
with PeakMemory() as peak:
    model = load_model(name, **({} if weights == "float" else {"weights": weights}))
    jax.block_until_ready(model.params)
seconds = time.perf_counter() - started
size = sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(model.params))
print(json.dumps({"peak": peak.bytes, "weights": size, "seconds": seconds,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(model: str, weights: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, model, weights], capture_output=True, text=True,
                            timeout=1800, env=None)
    if result.returncode != 0:
        raise SystemExit(f"loading {model} ({weights}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from engine_jax.registry import DEFAULT_MODEL, KNOWN_MODELS, pull

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[DEFAULT_MODEL, "gemma3-270m"])
    parser.add_argument("--weights", nargs="+", default=["float", "int8"])
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}")
    for model in args.model:
        if model in KNOWN_MODELS:
            pull(model)
        for weights in args.weights:
            r = measure(model, weights)
            print(f"{model:>24} {weights:>5}: peak {r['peak'] / 2**20:6.0f} MiB above the start "
                  f"(weights {r['weights'] / 2**20:5.0f} MiB), maxrss {r['maxrss'] / 2**20:6.0f} MiB, "
                  f"{r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
